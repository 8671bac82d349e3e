"""A one-page picture of a section's montage: every tile at its solved position and every pair as
a line between tile centres, coloured by its residual (px) after the solve; rejected pairs red
dashed, untrusted ones grey dotted, tiles left at their stage position shaded orange."""

from __future__ import annotations

import io
from typing import Sequence


def seam_figure(solved: dict, shapes: Sequence[tuple[int, int]], title: str = "") -> bytes:
    """PNG bytes of the section's seams (see module doc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    tiles = solved["tiles"]
    used = [p for p in solved["pairs"] if p["status"] == "used"]
    top = max([p["residual_px"] for p in used] + [1.0])
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 8))
    centre = {}
    for t, (h, w) in zip(tiles, shapes):
        at_stage = t["status"] != "placed"
        ax.add_patch(Rectangle((t["x"], t["y"]), w, h, fill=at_stage, alpha=0.35 if at_stage else 1.0,
                               facecolor="tab:orange" if at_stage else "none", edgecolor="0.5", lw=0.6))
        centre[t["index"]] = (t["x"] + w / 2, t["y"] + h / 2)
        ax.annotate(str(t["index"]), centre[t["index"]], fontsize=7, ha="center", va="center", color="0.3")
    for p in solved["pairs"]:
        (xa, ya), (xb, yb) = centre[p["a"]], centre[p["b"]]
        if p["status"] == "used":
            ax.plot([xa, xb], [ya, yb], color=cmap(p["residual_px"] / top), lw=2.5)
        elif p["status"] == "rejected":
            ax.plot([xa, xb], [ya, yb], "--", color="tab:red", lw=1.5)
        else:
            ax.plot([xa, xb], [ya, yb], ":", color="0.6", lw=1)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=ax, shrink=0.7, label="seam residual (px)")
    xs = [c[0] for c in centre.values()] + [t["x"] for t in tiles] + [t["x"] + w for t, (h, w) in zip(tiles, shapes)]
    ys = [c[1] for c in centre.values()] + [t["y"] for t in tiles] + [t["y"] + h for t, (h, w) in zip(tiles, shapes)]
    ax.set_xlim(min(xs) - 5, max(xs) + 5)
    ax.set_ylim(max(ys) + 5, min(ys) - 5)
    ax.set_aspect("equal")
    s = solved["summary"]
    median = s["seam_residual_median_px"]
    ax.set_title(f"{title}  placed {s['tiles_placed']}/{s['tiles']}, pairs used {s['pairs_used']}, rejected "
                 f"{s['pairs_rejected']}, untrusted {s['pairs_untrusted']}, residual median "
                 + (f"{median:.2f} px" if median is not None else "n/a"), fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
