import pytest
from hypothesis import given, settings, strategies as st

from exaconnect.errors import InputError
from exaconnect.precomputed.bbox import Box, chunk_grid, parse_triple

small = st.integers(min_value=1, max_value=40)
task = st.integers(min_value=4, max_value=40)


@settings(max_examples=150, deadline=None)
@given(st.tuples(st.integers(-20, 20), st.integers(-20, 20), st.integers(-20, 20)),
       st.tuples(small, small, small), st.tuples(task, task, task), st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)))
def test_grid_write_boxes_tile_the_bounds_exactly(offset, size, task_shape, overlap):
    bounds = Box.from_shape(size, offset)
    cells = list(chunk_grid(bounds, task_shape, overlap))
    assert sum(c.write.size for c in cells) == bounds.size
    covered = set()
    for cell in cells:
        assert bounds.contains(cell.write)
        assert cell.read.contains(cell.write) and bounds.contains(cell.read)
        voxels = {(x, y, z) for x in range(cell.write.start[0], cell.write.stop[0])
                  for y in range(cell.write.start[1], cell.write.stop[1])
                  for z in range(cell.write.start[2], cell.write.stop[2])}
        assert not covered & voxels
        covered |= voxels


def test_grid_overlap_and_alignment():
    bounds = Box((0, 0, 0), (100, 64, 64))
    cells = list(chunk_grid(bounds, (64, 64, 64), overlap=(8, 8, 8), align_to=(32, 32, 32)))
    assert [c.write.to_list() for c in cells] == [[0, 0, 0, 64, 64, 64], [64, 0, 0, 100, 64, 64]]
    assert cells[0].read.to_list() == [0, 0, 0, 64 + 8, 64, 64]
    assert cells[1].read.to_list() == [64 - 8, 0, 0, 100, 64, 64]
    with pytest.raises(InputError, match="multiple of the chunk size"):
        list(chunk_grid(bounds, (48, 64, 64), align_to=(32, 32, 32)))


def test_grid_anchored_at_origin_not_bounds():
    # A sub-box of a layer keeps the layer's chunk grid, so tasks never split a chunk.
    cells = list(chunk_grid(Box((10, 0, 0), (70, 32, 32)), (32, 32, 32), grid_origin=(0, 0, 0)))
    assert [c.write.start[0] for c in cells] == [10, 32, 64]


@pytest.mark.parametrize("text,message", [
    ("1,2,3", "expected six"), ("a,b,c,d,e,f", "not six integers"), ("0,0,0,0,5,5", "empty or inverted"),
])
def test_bad_boxes_are_named(text, message):
    with pytest.raises(InputError, match=message):
        Box.parse(text)


def test_parse_roundtrip_and_triples():
    assert str(Box.parse("1,2,3,4,5,6")) == "1,2,3,4,5,6"
    assert Box.parse("0,0,0,4,5,6").shape == (4, 5, 6)
    assert parse_triple("8,8,4", "--chunk-size") == (8, 8, 4)
    with pytest.raises(InputError, match="--chunk-size"):
        parse_triple("8,0,4", "--chunk-size")


@pytest.mark.parametrize("text", ["nan,4,4", "inf,4,4", "4,-inf,4", "4,4,0", "4,4", "a,b,c"])
def test_resolution_must_be_three_finite_positive_numbers(text):
    from exaconnect.precomputed.bbox import parse_resolution

    with pytest.raises(InputError, match="--resolution"):
        parse_resolution(text)


def test_resolution_parses():
    from exaconnect.precomputed.bbox import parse_resolution

    assert parse_resolution("4,4.5,40") == (4.0, 4.5, 40.0)


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.integers(-20, 20), st.integers(-20, 20), st.integers(-20, 20)),
       st.tuples(small, small, small), st.tuples(st.sampled_from([2, 4, 8, 16]), st.sampled_from([2, 4, 8, 16]), st.sampled_from([2, 4, 8, 16])),
       st.data())
def test_chunk_boxes_are_the_clipped_chunks_touching_a_region(offset, size, chunk, data):
    from exaconnect.precomputed.bbox import chunk_boxes, snap_to_grid

    bounds = Box.from_shape(size, offset)
    start = tuple(data.draw(st.integers(a, b - 1)) for a, b in zip(bounds.start, bounds.stop))
    stop = tuple(data.draw(st.integers(a + 1, b)) for a, b in zip(start, bounds.stop))
    region = Box(start, stop)
    boxes = list(chunk_boxes(region, bounds, chunk))
    whole = snap_to_grid(region, chunk, bounds.start, bounds)
    assert whole.contains(region) and bounds.contains(whole)
    assert sum(b.size for b in boxes) == whole.size
    for b in boxes:
        # on the layer's chunk grid, clipped only by the layer's bounds, touching the region
        assert all((a - o) % c == 0 for a, o, c in zip(b.start, bounds.start, chunk))
        assert all(e == min(a + c, s) for a, e, c, s in zip(b.start, b.stop, chunk, bounds.stop))
        assert not b.intersection(region).empty()
