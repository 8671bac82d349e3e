"""Alignment kernels on synthetic shifts: sub-pixel flow, coarse translation, peak tests, masks,
mesh relaxation and composition, warping, block anchoring."""

import numpy as np
import pytest
from scipy import ndimage

from exaconnect.errors import InputError
from exaconnect.align.coarse import CoarseConfig, estimate_translation, fit_affine, fit_rigid, rotation_degrees
from exaconnect.align.flow import (FlowConfig, cross_correlate, estimate_flow, find_peaks, grid_points,
                                               section_mask)
from exaconnect.align.mesh import (SpringMeshConfig, block_ranges, compose, compose_blocks, detrend_meshes,
                                               identity_mesh, relax_mesh)
from exaconnect.align.warp import region_map, render_section

SMALL = FlowConfig(patch_size=64, stride=16, min_peak_sharpness=5, min_peak_ratio=1.1)


def texture(shape=(200, 200), seed=0, sigma=1.5):
    """EM-like texture: smoothed noise scaled to 8 bits, strictly positive (0 means 'no data')."""
    rng = np.random.default_rng(seed)
    t = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    t = (t - t.mean()) / t.std()
    return np.clip(128 + 35 * t, 1, 255).astype(np.float32)


def fourier_shift(image, shift):
    """Exact sub-pixel translation: out(p) = image(p - shift), periodic."""
    return np.real(np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(image), shift))).astype(np.float32)


@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.3, -0.7), (3.37, -5.62), (-7.5, 2.25)])
def test_flow_recovers_subpixel_translation(shift):
    ref = texture()
    mov = fourier_shift(ref, shift)  # mov(p + shift) = ref(p)
    field = estimate_flow(ref, mov, (round(shift[0]), round(shift[1])), SMALL)
    inner = field.valid[2:-2, 2:-2]
    vectors = field.flow[2:-2, 2:-2][inner]
    assert inner.mean() > 0.9
    error = np.linalg.norm(vectors - np.array(shift), axis=1)
    # SOFIMA stops at whole pixels; the refined estimate must be well below that.
    assert np.median(error) < 0.05 and error.max() < 0.2


def test_flow_follows_a_smooth_distortion():
    ref = texture((240, 240), seed=1)
    yy, xx = np.mgrid[:240, :240].astype(float)
    dy = 3.0 * np.sin(2 * np.pi * xx / 240)
    dx = 2.0 * np.cos(2 * np.pi * yy / 240)
    # mov(p + d(p)) = ref(p), approximately: sample ref at p - d(p).
    mov = ndimage.map_coordinates(ref, [yy - dy, xx - dx], order=3, mode="reflect")
    field = estimate_flow(ref, mov, (0.0, 0.0), SMALL)
    points = grid_points(ref.shape, SMALL.stride).astype(int).clip(0, 239)
    truth = np.stack([dy[points[..., 0], points[..., 1]], dx[points[..., 0], points[..., 1]]], axis=-1)
    error = np.linalg.norm(field.flow - truth, axis=-1)[2:-2, 2:-2][field.valid[2:-2, 2:-2]]
    assert np.median(error) < 0.25


def test_coarse_translation_large_shift_and_blank():
    ref = texture((240, 240), seed=2)
    shift = (30.0, -25.0)
    mov = np.zeros_like(ref)
    mov[30:, :-25] = ref[:-30, 25:]  # mov(p + shift) = ref(p); the uncovered band is 0 (no data)
    match = estimate_translation(ref, mov, CoarseConfig(downsample=4))
    assert np.allclose(match.shift, shift, atol=1.5)
    assert match.ok(CoarseConfig())
    blank = estimate_translation(ref, np.zeros_like(ref))
    assert blank.correlation == 0.0 and not blank.ok(CoarseConfig())


def test_peak_tests_reject_inverted_and_unrelated_sections():
    ref = texture(seed=3)
    inverted = 256 - ref
    unrelated = texture(seed=4)
    assert estimate_flow(ref, inverted, (0, 0), SMALL).valid_fraction < 0.05
    assert estimate_flow(ref, unrelated, (0, 0), SMALL).valid_fraction < 0.05
    same = estimate_flow(ref, ref.copy(), (0, 0), SMALL)
    # Corner grid points have three quarters of their patch outside the section (masked): invalid.
    assert same.valid[1:-1, 1:-1].mean() > 0.95 and not same.valid[0, 0] and not same.valid[-1, -1]


def test_find_peaks_statistics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 32, 32)).astype(np.float32)
    b = np.stack([np.roll(a[0], (2, -3), axis=(0, 1)), rng.normal(size=(32, 32))]).astype(np.float32)
    peaks = find_peaks(cross_correlate(a, b, 16), 15, 3)
    assert np.allclose(peaks.shift[0], (2, -3), atol=0.2)
    assert peaks.sharpness[0] > 3 * peaks.sharpness[1]
    assert peaks.ratio[0] > 1.5


def test_section_mask_flags_fill_folds_and_blank():
    image = texture()
    image[:, :20] = 0  # outside the imaged area
    image[100:108, :] = 12  # a fold: flat dark band
    mask = section_mask(image)
    assert not mask[:, :20].any() and not mask[100:108].any()
    assert mask[30:90, 40:180].all()
    assert not section_mask(np.zeros((64, 64))).any()


def test_flow_config_validation():
    with pytest.raises(InputError):
        FlowConfig(patch_size=4)
    with pytest.raises(InputError):
        SpringMeshConfig(detrend="quadratic")


def test_fit_affine_and_rigid():
    rng = np.random.default_rng(5)
    points = rng.uniform(0, 200, (50, 2))
    angle = np.radians(1.2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    targets = points @ rot.T + np.array([4.0, -3.0])
    targets[:5] += 40  # outliers
    affine = fit_affine(points, targets)
    assert np.allclose(affine[:, :2], rot, atol=1e-6) and np.allclose(affine[:, 2], (4, -3), atol=1e-4)
    assert abs(rotation_degrees(affine) - 1.2) < 1e-4
    weights = np.ones(50)
    weights[:5] = 0
    rigid = fit_rigid(points, targets, weights)
    assert np.allclose(rigid[:, :2], rot, atol=1e-9)


def test_relax_mesh_rigid_targets_exact_and_holes_bridged():
    config = SpringMeshConfig(stride=20)
    rest = identity_mesh((200, 200), 20)
    angle = np.radians(0.8)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    targets = rest @ rot.T + np.array([10.5, -7.25])
    weights = np.ones(rest.shape[:2])
    weights[3:7, 3:7] = 0
    garbage = targets.copy()
    garbage[3:7, 3:7] = 999.0  # ignored: zero weight
    solved = relax_mesh(rest, garbage, weights, config)
    assert np.abs(solved - targets).max() < 1e-6
    # A local bump in the targets is followed, smoothed by the in-plane springs.
    bumped = targets.copy()
    bumped[5, 5] += (3.0, 0.0)
    solved = relax_mesh(rest, bumped, np.ones(rest.shape[:2]), config)
    assert 0.5 < solved[5, 5, 0] - targets[5, 5, 0] < 3.0
    assert np.abs(solved[0, 0] - targets[0, 0]).max() < 0.2


def test_compose_and_blocks():
    stride = 10
    identity = identity_mesh((101, 101), stride)
    shifted = identity + np.array([2.0, -1.0])
    assert np.allclose(compose(shifted, shifted, stride), identity + np.array([4.0, -2.0]))
    # Block 2 starts at section 3 (its identity); globally section 3 sits at `shifted`.
    blocks = [(0, {0: identity, 1: identity, 2: shifted, 3: shifted}), (3, {3: identity, 4: shifted})]
    result = compose_blocks(blocks, stride)
    assert np.allclose(result[4], identity + np.array([4.0, -2.0]))
    detrended = detrend_meshes({z: identity + z * np.array([0.5, 0.0]) for z in range(5)}, identity, list(range(5)), "linear")
    assert all(np.allclose(m, identity) for m in detrended.values())
    centred = detrend_meshes({z: identity + np.array([3.0, 1.0]) for z in range(3)}, identity, [0, 1, 2], "mean")
    assert all(np.allclose(m, identity) for m in centred.values())


def test_block_anchor_avoids_sections_skipped_over():
    config = SpringMeshConfig(block_size=10, block_overlap=3)
    plain = block_ranges(24, config)
    assert plain[0] == (0, 10) and plain[1][0] == 6 and plain[-1][1] == 24
    # Section 6 is inverted and 7 matched 5: no block may start at 6 or 7 (7 skips over 6).
    refs = {z: z - 1 for z in range(24)}
    refs[7] = 5
    statuses = {z: "ok" for z in range(24)}
    statuses[6] = "inverted"
    statuses[7] = "skipped to 5"
    ranges = block_ranges(24, config, refs, statuses)
    assert all(start not in (6, 7) for start, _ in ranges[1:])
    for (a0, a1), (b0, _) in zip(ranges[:-1], ranges[1:]):
        assert a0 < b0 < a1  # every anchor lies in the previous block


def test_render_translation_is_exact():
    image = texture((120, 120), seed=6)
    stride = 20
    mesh = identity_mesh(image.shape, stride) + np.array([5.0, -3.0])
    out, valid = render_section(image, mesh, stride, order=1)
    assert np.allclose(out[:-5, 3:], image[5:, :-3], atol=1e-3)
    assert not valid[-5:].any() and valid[:-5, 3:].all()
    positions = region_map(mesh, stride, (10, 20, 30, 40))
    assert np.allclose(positions[0, 0], (15.0, 27.0))


# ---------------------------------------------------------------- second round: drift prior, tiles, configs

def test_local_linear_smoother_reproduces_lines_at_the_ends():
    from exaconnect.align.mesh import local_linear_weights

    zs = np.arange(40, dtype=float)
    weights = local_linear_weights(zs, zs, 6.0)
    line = 3.0 - 0.7 * zs
    assert np.allclose(weights @ line, line, atol=1e-9)
    assert np.allclose(weights.sum(axis=1), 1.0)


def test_drift_prior_removes_slow_motion_and_keeps_jumps():
    from exaconnect.align.mesh import drift_window_for, remove_drift

    stride = 10
    identity = identity_mesh((101, 101), stride)
    rng = np.random.default_rng(1)
    n = 60
    drift = np.cumsum(np.full((n, 2), 0.25) + rng.normal(0, 0.05, (n, 2)), axis=0)  # ~15 px over the stack
    jumps = rng.uniform(-20, 20, (n, 2))  # a real misalignment: independent per section
    meshes = {z: identity + drift[z] + jumps[z] for z in range(n)}
    out = remove_drift(meshes, identity, list(range(n)), 32.0)
    recovered = np.stack([out[z][5, 5] - identity[5, 5] for z in range(n)])
    # Neighbour differences keep the jumps; the slow drift (0.25 px per section) is gone.
    err = np.diff(recovered, axis=0) - np.diff(jumps, axis=0)
    assert np.abs(err.mean(axis=0)).max() < 0.1 and np.sqrt((err**2).mean()) < 0.8
    # An aligned stack with only drift comes out where it went in.
    still = remove_drift({z: identity + drift[z] for z in range(n)}, identity, list(range(n)), 2.0)
    assert max(np.abs(still[z] - identity).max() for z in range(n)) < 0.3
    config = SpringMeshConfig(stride=stride)
    assert drift_window_for({z: identity + drift[z] for z in range(n)}, identity, list(range(n)), config) <= 2.0
    assert drift_window_for(meshes, identity, list(range(n)), config) > 30  # ~11.5 px per axis / 0.25 px
    assert drift_window_for(meshes, identity, list(range(n)), SpringMeshConfig(stride=stride, drift_window=7.0)) == 7.0


def test_config_validation_names_the_option_and_round_trips():
    from exaconnect.align.match import AlignConfig

    for bad, name in ((dict(drift_prior="spring"), "drift_prior"), (dict(drift_window=-1.0), "drift_window")):
        with pytest.raises(InputError, match=name):
            SpringMeshConfig(**bad)
    for bad, name in ((dict(taper=0.7), "taper"), (dict(highpass_sigma=-1.0), "highpass_sigma"),
                      (dict(tile_size=100), "tile_size"), (dict(refine_iterations=0), "refine_iterations")):
        with pytest.raises(InputError, match=name):
            FlowConfig(**bad)
    with pytest.raises(InputError, match="max_skip"):
        AlignConfig(max_skip=0)
    config = AlignConfig(flow=FlowConfig(patch_size=48, stride=12, highpass_sigma=4.0),
                         mesh=SpringMeshConfig(stride=12, drift_prior="none", drift_window=9.0))
    assert AlignConfig.from_dict(config.as_dict()) == config
    assert FlowConfig.from_dict(config.flow.as_dict()) == config.flow
    assert SpringMeshConfig.from_dict(config.mesh.as_dict()) == config.mesh


def test_prepared_reference_transforms_are_reused():
    from exaconnect.align.flow import prepare_section

    a, b, c = texture(seed=7), fourier_shift(texture(seed=7), (0.4, -1.2)), fourier_shift(texture(seed=7), (2.0, 0.5))
    ref = prepare_section(a, SMALL)
    first = estimate_flow(ref, prepare_section(b, SMALL), (0, -1), SMALL)
    cached = dict(ref.transforms)
    assert len(cached) == 2  # the coarse and the fine pass
    second = estimate_flow(ref, prepare_section(c, SMALL), (2, 0), SMALL)
    assert all(ref.transforms[k] is v for k, v in cached.items())
    assert np.median(np.linalg.norm(first.flow[first.valid] - (0.4, -1.2), axis=1)) < 0.05
    assert np.median(np.linalg.norm(second.flow[second.valid] - (2.0, 0.5), axis=1)) < 0.05


def test_tiled_flow_equals_whole_section_flow():
    from exaconnect.align.flow import estimate_flow_tiled

    size = 640
    ref = texture((size, size), seed=8)
    yy, xx = np.mgrid[:size, :size].astype(float)
    dy = 6.0 + 2.5 * np.sin(2 * np.pi * xx / size)
    dx = -4.0 + 2.0 * np.cos(2 * np.pi * yy / size)
    mov = ndimage.map_coordinates(ref, [yy - dy, xx - dx], order=3, mode="constant").astype(np.float32)
    config = FlowConfig(patch_size=48, stride=16, tile_size=256)
    whole = estimate_flow(ref, mov, (6.0, -4.0), config)

    def reader(image):
        def read(y0, y1, x0, x1):
            padded = np.pad(image, size)
            return padded[y0 + size: y1 + size, x0 + size: x1 + size]
        return read

    tiled = estimate_flow_tiled(reader(ref), reader(mov), (size, size), (6.0, -4.0), config)
    both = whole.valid & tiled.valid
    assert both.mean() > 0.7 and abs(whole.valid_fraction - tiled.valid_fraction) < 0.05
    assert np.median(np.linalg.norm(whole.flow - tiled.flow, axis=-1)[both]) < 0.02


def test_dense_field_and_region_map_match_bilinear_interpolation():
    from exaconnect.align.flow import dense_field

    rng = np.random.default_rng(3)
    grid = rng.normal(size=(7, 9, 2))
    stride = 8
    dense = dense_field(grid, stride, (50, 70))
    yy, xx = np.mgrid[:50, :70] / stride
    expected = np.stack([ndimage.map_coordinates(grid[..., c], [yy, xx], order=1, mode="nearest") for c in range(2)], -1)
    assert np.allclose(dense, expected, atol=1e-9)
    mesh = identity_mesh((49, 65), stride) + grid
    positions = region_map(mesh, stride, (-5, 60, 3, 80))
    yy, xx = np.mgrid[-5:60, 3:80].astype(float)
    disp = np.stack([ndimage.map_coordinates(grid[..., c], [yy / stride, xx / stride], order=1, mode="nearest")
                     for c in range(2)], -1)
    assert np.allclose(positions, np.stack([yy, xx], -1) + disp, atol=1e-9)
