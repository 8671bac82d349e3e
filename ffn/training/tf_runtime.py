"""TensorFlow set-up shared by training and evaluation: quiet start-up logs, thread pools."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def quiet_tensorflow() -> None:
    """Hides TensorFlow's start-up chatter (C++ INFO/WARNING lines such as oneDNN and CPU
    feature notices; absl INFO records). The environment variable only works before
    TensorFlow is first imported, which callers of train() usually have not done yet."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # absl comes with TensorFlow; nothing to quiet without it
        pass


def set_tf_threads(intra: int, inter: int) -> None:
    """Limits TensorFlow's thread pools (0 leaves a pool at its default). Must run before
    TensorFlow executes anything; later it cannot change and a warning says so."""
    if not intra and not inter:
        return
    import tensorflow as tf

    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as exc:
        current = (tf.config.threading.get_intra_op_parallelism_threads(),
                   tf.config.threading.get_inter_op_parallelism_threads())
        if current != (intra or current[0], inter or current[1]):
            logger.warning("cannot set TensorFlow threads to %d/%d (already %s): %s", intra, inter, current, exc)
