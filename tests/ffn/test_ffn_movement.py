"""FOV movement: face maxima, thresholds, ordering and the visited-cell rule."""

import numpy as np

from exaconnect.ffn.movement import FaceMaxMovement, face_moves


def _logits(fill=-5.0):
    return np.full((33, 33, 33), fill, dtype=np.float32)


def test_face_moves_pick_the_face_maximum_above_threshold():
    logits = _logits()
    logits[16 + 8, 16 + 2, 16 - 3] = 4.0  # +z face, off-centre
    logits[16, 16, 16 - 8] = 3.0  # -x face, centre
    logits[16, 16 - 8, 16] = 1.0  # below threshold
    moves = face_moves(logits, (8, 8, 8), threshold=2.0)
    assert moves == [(np.float32(4.0), (8, 2, -3)), (np.float32(3.0), (0, 0, -8))]


def test_face_moves_only_look_within_deltas_of_the_centre():
    logits = _logits()
    logits[16 + 8, 16 + 9, 16] = 9.0  # on the +z plane but outside the +/-8 window
    assert face_moves(logits, (8, 8, 8), threshold=0.0) == []


def test_movement_skips_visited_cells_and_queues_in_order():
    move = FaceMaxMovement((8, 8, 8), score_threshold=2.0)
    move.reset((40, 40, 40))
    first = next(move.candidates())
    assert first == (40, 40, 40)
    logits = _logits()
    logits[16 + 8, 16, 16] = 5.0
    logits[16, 16, 16 + 8] = 6.0
    move.update(logits, first)
    assert [c for _, c in move.queue] == [(40, 40, 48), (48, 40, 40)]
    # A candidate in the already evaluated cell is dropped.
    move.queue.appendleft((9.0, (41, 42, 43)))
    assert list(move.candidates()) == [(40, 40, 48), (48, 40, 40)]


def test_cells_are_centred_on_the_seed():
    move = FaceMaxMovement((8, 8, 8), score_threshold=2.0)
    move.reset((40, 40, 40))
    assert move.cell((40, 40, 40)) == (0, 0, 0)
    assert move.cell((43, 36, 40)) == (0, 0, 0)
    assert move.cell((44, 40, 40)) == (1, 0, 0)
    assert move.cell((35, 40, 40)) == (-1, 0, 0)
