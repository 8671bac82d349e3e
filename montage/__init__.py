"""Montage kernels: stitching the overlapping tiles of each section into one image, as plain
functions of numpy arrays (SOFIMA's shape). manifest (tile sets in, checked whole), match
(pairwise offsets by masked cross-correlation), solve (global positions with outlier
rejection), intensity (per-tile gain/offset), render (any output box from the tiles touching
it), quality (measures against a known truth), synthetic (tile sets cut from whole sections).
`services/montage.py` wraps them as queue tasks."""
