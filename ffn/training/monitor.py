"""Monitoring of FFN training: a metrics log (JSON lines), TensorBoard scalars, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILENAME = "metrics.jsonl"
PLOT_FILENAME = "training.png"


class MetricsLog:
    """Appends one JSON object per record to `<out_dir>/metrics.jsonl` and to TensorBoard."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILENAME
        self.enabled = enabled
        self._writer = None
        if enabled:
            import tensorflow as tf

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(self.out_dir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        import tensorflow as tf

        record = {"step": int(step), "kind": kind, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        with self._writer.as_default():  # type: ignore[union-attr]
            for key, value in values.items():
                # tf.summary.write with the scalars plugin's metadata is what tf.summary.scalar
                # does, without needing the tensorboard package installed to *write* logs.
                tf.summary.write(f"{kind}/{key}", tf.constant(float(value), tf.float32), step=int(step),
                                 metadata=_scalar_metadata())
        self._writer.flush()  # type: ignore[union-attr]


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    return metadata


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(out_dir: str | Path, validation_key: str = "f1") -> Path | None:
    """`training.png`: training loss and the validation metric over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "validation" and validation_key in r]
    if not train and not val:
        return None
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("sigmoid cross-entropy")
    ax_loss.set_title("training loss")
    if val:
        ax_val.plot([r["step"] for r in val], [r[validation_key] for r in val], "o-", lw=1)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel(validation_key)
    ax_val.set_title(f"validation {validation_key} (FOV masks)")
    fig.tight_layout()
    path = Path(out_dir) / PLOT_FILENAME
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
