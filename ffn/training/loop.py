"""The FFN training loop: FOV movement inside examples, loss, checkpoints, resume, summaries.

Each slot of the batch holds one example: an image patch of `fov + 2 * deltas * fov_moves`
voxels around a sampled centre, the soft mask of the centre's object, and a mask canvas of
logits started as in inference (0.95 at the centre, 0.05 elsewhere). The FOV visits positions
inside the patch; a position is taken only when the network's *own* current prediction there
passes the move threshold, so the network learns from the situations its inference meets.
Every visit is one training step for that slot; its prediction is written back into the
canvas before the next visit (reference google/ffn `train.py`, `get_example`/`get_batch`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy.special import logit

from exaconnect.errors import InputError

from .augment import augment_example, valid_transforms
from .config import TrainConfig, config_to_yaml, model_config_of
from .data import ExampleSource, build_example_source
from .loss_weights import boundary_weights
from .tf_runtime import quiet_tensorflow, set_tf_threads  # noqa: F401  (set_tf_threads: for the benches)

logger = logging.getLogger(__name__)

TRAIN_STATE_DIR = "train_state"
MODEL_DIR = "model"
MILESTONES_DIR = "milestones"


# --- movement inside one example -----------------------------------------------------------

@dataclass(frozen=True)
class WalkSettings:
    fov_zyx: tuple[int, int, int]
    deltas_zyx: tuple[int, int, int]
    fov_moves: int
    policy: str
    move_logit: float
    init_logit: float
    pad_logit: float


def walk_settings(config: TrainConfig) -> WalkSettings:
    t = config.training
    return WalkSettings(config.model.fov_zyx, config.model.deltas_zyx, t.fov_moves, t.fov_policy,
                        float(logit(t.move_threshold)), float(logit(t.init_activation)), float(logit(t.seed_pad)))


class ExampleWalk:
    """One example and its mask canvas; `offsets()` yields FOV offsets (z, y, x) from the centre.

    After each yield the caller writes the network's prediction into `canvas` (see `update`)
    before asking for the next offset, which is decided on the updated canvas.
    """

    def __init__(self, image: np.ndarray, mask: np.ndarray, settings: WalkSettings, softness: float,
                 rng: np.random.Generator, weights: np.ndarray | None = None):
        self.settings = settings
        self.image = image.astype(np.float32, copy=False)
        self.mask = mask
        self.target = np.where(mask, 1.0 - softness, softness).astype(np.float32)
        self.weights = weights  # per-voxel loss weights (None: all 1)
        self.canvas = np.full(image.shape, settings.pad_logit, dtype=np.float32)
        self.center = np.array(image.shape) // 2
        self.canvas[tuple(self.center)] = settings.init_logit
        self.rng = rng
        self.visits = 0

    def _sel(self, offset) -> tuple[slice, ...]:
        start = self.center + np.asarray(offset) - np.asarray(self.settings.fov_zyx) // 2
        return tuple(slice(int(s), int(s) + f) for s, f in zip(start, self.settings.fov_zyx))

    def crops(self, offset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sel = self._sel(offset)
        return self.canvas[sel], self.image[sel], self.target[sel]

    def weight_crop(self, offset) -> np.ndarray:
        if self.weights is None:
            return np.ones(self.settings.fov_zyx, dtype=np.float32)
        return self.weights[self._sel(offset)]

    def update(self, offset, logits: np.ndarray) -> None:
        self.canvas[self._sel(offset)] = logits
        self.visits += 1

    def _value(self, array: np.ndarray, offset) -> float:
        return float(array[tuple(self.center + np.asarray(offset))])

    def offsets(self) -> Iterator[tuple[int, int, int]]:
        if self.settings.policy == "max_pred":
            yield from self._max_pred_offsets()
        else:
            yield from self._fixed_offsets()

    def _fixed_offsets(self) -> Iterator[tuple[int, int, int]]:
        # The centre first, then every shift by multiples of the deltas up to fov_moves (the
        # 26 neighbours for one move, as the reference), in random order.
        yield (0, 0, 0)
        m = self.settings.fov_moves
        steps = [range(-m, m + 1) if d > 0 else range(0, 1) for d in self.settings.deltas_zyx]
        shifts = [tuple(int(k * d) for k, d in zip(ks, self.settings.deltas_zyx))
                  for ks in np.array(np.meshgrid(*steps, indexing="ij")).reshape(3, -1).T]
        shifts = [s for s in shifts if any(s)]
        for i in self.rng.permutation(len(shifts)):
            offset = shifts[int(i)]
            if self._value(self.canvas, offset) >= self.settings.move_logit:
                yield offset  # type: ignore[misc]

    def _max_pred_offsets(self) -> Iterator[tuple[int, int, int]]:
        # The inference policy (face maxima of the current prediction), limited to the patch,
        # and only into voxels of the true object: moves the network wants but should not
        # make teach it nothing the loss does not already say.
        from collections import deque

        from ..movement import face_moves

        deltas = np.asarray(self.settings.deltas_zyx)
        limit = deltas * self.settings.fov_moves
        queue = deque([(0, 0, 0)])
        done: set[tuple[int, ...]] = set()
        while queue:
            offset = np.asarray(queue.popleft())
            if np.any(np.abs(offset) > limit):
                continue
            cell = tuple(int(v) for v in (offset + deltas // 2) // np.maximum(deltas, 1))
            if cell in done:
                continue
            is_center = not offset.any()
            if not is_center and (self._value(self.canvas, offset) < self.settings.move_logit
                                  or not self._value(self.mask, offset)):
                continue
            done.add(cell)
            yield tuple(int(v) for v in offset)  # type: ignore[misc]
            canvas_crop = self.canvas[self._sel(offset)]
            for _, move in face_moves(canvas_crop, tuple(int(d) for d in deltas), self.settings.move_logit):
                queue.append(tuple(int(a + b) for a, b in zip(move, offset)))


class BatchFeeder:
    """Keeps `batch` examples walking; `next()` returns the FOV crops of one training step."""

    def __init__(self, source: ExampleSource, config: TrainConfig, batch: int, rng: np.random.Generator,
                 augment: bool = True):
        self.source = source
        self.config = config
        self.settings = walk_settings(config)
        self.rng = rng
        self.augment = augment
        self.transforms = [valid_transforms(v.resolution, source.shape, config.augment.permute_axes,
                                            config.augment.flip_axes) for v in source.volumes]
        self.slots: list[tuple[ExampleWalk, Iterator] | None] = [None] * batch
        self.current: list[tuple[int, int, int]] = [(0, 0, 0)] * batch
        self.examples_started = 0

    def _new_walk(self) -> tuple[ExampleWalk, Iterator]:
        image, mask, vi = self.source.draw(self.rng)
        if self.augment:
            image, mask = augment_example(image, mask, self.rng, self.config.augment, self.transforms[vi])
        t = self.config.training
        walk = ExampleWalk(image, mask, self.settings, t.label_softness, self.rng,
                           boundary_weights(mask, t.boundary_weight, t.boundary_radius))
        self.examples_started += 1
        return walk, walk.offsets()

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Seeds, images, targets and per-voxel loss weights, [batch, z, y, x] each."""
        seeds, images, targets, weights = [], [], [], []
        for i in range(len(self.slots)):
            while True:
                if self.slots[i] is None:
                    self.slots[i] = self._new_walk()
                walk, offsets = self.slots[i]  # type: ignore[misc]
                offset = next(offsets, None)
                if offset is None:
                    self.slots[i] = None
                    continue
                break
            self.current[i] = offset
            seed, image, target = walk.crops(offset)
            seeds.append(seed.copy())
            images.append(image)
            targets.append(target)
            weights.append(walk.weight_crop(offset))
        return np.stack(seeds), np.stack(images), np.stack(targets), np.stack(weights)

    def update(self, logits: np.ndarray) -> None:
        for i, slot in enumerate(self.slots):
            if slot is not None:
                slot[0].update(self.current[i], logits[i])


# --- validation ----------------------------------------------------------------------------

def validation_metrics(forward, source: ExampleSource, config: TrainConfig, count: int, seed: int = 1234,
                       batch: int = 8) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of the final example masks (p > 0.5) on `count`
    fixed examples, walked by the network as in training but without updates or augmentation."""
    rng = np.random.default_rng(seed)
    tp = fp = fn = tn = 0
    loss_sum = 0.0
    evaluations = 0
    for start in range(0, count, batch):
        n = min(batch, count - start)
        feeder = BatchFeeder(source, config, n, rng, augment=False)
        walks = [feeder._new_walk() for _ in range(n)]
        active = list(range(n))
        while active:
            taken, crops = [], []
            for i in active:
                offset = next(walks[i][1], None)
                if offset is not None:
                    taken.append((i, offset))
                    crops.append(walks[i][0].crops(offset))
            if not taken:
                break
            logits = forward(np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops]))
            for (i, offset), out in zip(taken, logits):
                walks[i][0].update(offset, out)
            evaluations += len(taken)
            active = [i for i, _ in taken]
        for walk, _ in walks:
            predicted = walk.canvas > 0
            truth = walk.mask
            tp += int(np.sum(predicted & truth))
            fp += int(np.sum(predicted & ~truth))
            fn += int(np.sum(~predicted & truth))
            tn += int(np.sum(~predicted & ~truth))
            z = np.clip(walk.canvas, -30, 30)
            loss_sum += float(np.mean(np.maximum(z, 0) - z * walk.target + np.log1p(np.exp(-np.abs(z)))))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1),
        "canvas_loss": loss_sum / max(count, 1),
        "evaluations": evaluations,
    }


# --- the run -------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path  # loadable with ffn.load_model / ffn.checkpoint.load_network
    step: int
    resumed_from: int
    steps_run: int
    seconds: float
    examples_per_second: float
    last_loss: float
    validation: dict[str, float] = dataclasses.field(default_factory=dict)




def glorot_init(model, seed: int) -> None:
    """Fresh weights for training from scratch: Glorot-uniform kernels, zero biases.

    The reference built its convolutions with tf.contrib.layers defaults (Xavier/Glorot);
    ConvStack3D's own N(0, 0.01) start is meant for tests and makes a fresh network learn
    slowly, because the residual updates start almost at zero.
    """
    rng = np.random.default_rng([seed, 7])
    for name, variable in model.weights.items():
        kz, ky, kx, cin, cout = variable.shape
        limit = float(np.sqrt(6.0 / (kz * ky * kx * (cin + cout))))
        variable.assign(rng.uniform(-limit, limit, size=variable.shape).astype(np.float32))
        model.biases[name].assign(np.zeros(model.biases[name].shape, np.float32))


def _init_weights(model, config: TrainConfig) -> None:
    """Fine-tuning: weights from an exaconnect checkpoint directory or a reference TF1 prefix."""
    from ..checkpoint import load_network
    from ..config import FFNConfig

    path = config.training.init_checkpoint
    # Our checkpoints carry their own config; a reference TF1 prefix does not store FOV and
    # deltas, so the config's model stands in for them (depth and width are still checked).
    given = None if Path(path).is_dir() else FFNConfig(model=config.model, inference=config.inference)
    try:
        source, source_config = load_network(path, given)
    except (ValueError, InputError) as exc:
        raise InputError(f"training.init_checkpoint={path}: cannot load it into model {config.model}: {exc}") from None
    if source_config.model != config.model:
        raise InputError(f"training.init_checkpoint={path}: its model {source_config.model} differs from the "
                         f"config's model {config.model}")
    weights, biases = source.numpy_weights()
    model.assign(weights, biases)
    logger.info("initialized weights from %s", path)




class ProgressLines:
    """Training progress for logs and workers (no terminal): one line every `every` steps
    with the rate and the time left (steps or the time budget, whichever ends first)."""

    def __init__(self, total: int, start: int, every: int, deadline: float | None):
        self.total, self.start, self.deadline = total, start, deadline
        remaining = max(total - start, 1)
        self.every = every or max(1, min(remaining // 20 or 1, 1000))
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / max(elapsed, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        if self.deadline is not None:
            left = min(left, max(self.deadline - time.perf_counter(), 0.0))
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left != float("inf") else "?"
        print(f"train: step {step}/{self.total} ({100.0 * step / self.total:.0f} %), {rate:.2f} steps/s, "
              f"{eta} left, loss {loss:.4f}", file=sys.stderr, flush=True)




def _resumed_cpu_seconds(out_dir: Path) -> float:
    """CPU seconds a resumed run had already used (its last logged train record), else 0."""
    path = out_dir / "metrics.jsonl"
    last = 0.0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            value = record.get("cpu_seconds") if isinstance(record, dict) else None
            if isinstance(value, (int, float)):
                last = float(value)
    return last


def _run_dirs(config: TrainConfig, strategy) -> tuple[Path, Path, bool, int]:
    """(out_dir, write_dir, chief, worker index): non-chief workers of a multi-worker job must
    take part in saving, but into scratch space; every worker resumes from the chief's
    checkpoints (out_dir on a shared filesystem)."""
    from .distribute import is_chief

    out_dir = Path(config.training.out_dir)
    chief = is_chief(strategy)
    worker_index = getattr(getattr(strategy, "cluster_resolver", None), "task_id", 0) or 0
    write_dir = out_dir if chief else out_dir / f"worker-{worker_index}-scratch"
    write_dir.mkdir(parents=True, exist_ok=True)
    if chief:
        (out_dir / "config.yaml").write_text(config_to_yaml(config))
    return out_dir, write_dir, chief, worker_index


def _example_sources(config: TrainConfig, out_dir: Path, example_source: ExampleSource | None,
                     validation_source: ExampleSource | None) -> tuple[ExampleSource, ExampleSource | None]:
    """The training and validation examples: the given ones, else built from the config's volumes
    (partitions cached in data.cache_dir, default OUT_DIR/partitions)."""
    d = config.data
    cache_dir = d.cache_dir or str(out_dir / "partitions")
    if example_source is None:
        example_source = build_example_source(d.volumes, config.example_shape_zyx, config.lom_radius_zyx, d.thresholds,
                                              d.min_size, d.image_mean, d.image_stddev, cache_dir)
    if validation_source is None and d.validation_volumes and config.training.validation_examples > 0:
        validation_source = build_example_source(d.validation_volumes, config.example_shape_zyx, config.lom_radius_zyx,
                                                 d.thresholds, d.min_size, d.image_mean, d.image_stddev, cache_dir)
    return example_source, validation_source


def _model_and_state(config: TrainConfig, strategy, out_dir: Path, write_dir: Path):
    """The network, its optimizer and checkpoint state: resumed from OUT_DIR's latest training
    checkpoint, else initialised from `training.init_checkpoint` (fine-tuning), else at random.
    Returns (model, optimizer, step variable, checkpoint, manager, step resumed from)."""
    import tensorflow as tf

    from ..model import ConvStack3D
    from .distribute import Optimizer, ordered_variables

    t = config.training
    with strategy.scope():
        model = ConvStack3D(config.model, seed=t.seed)
        optimizer = Optimizer(config.optimizer, ordered_variables(model))
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    checkpoint = tf.train.Checkpoint(weights=model.weights, biases=model.biases, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(checkpoint, str(write_dir / TRAIN_STATE_DIR), max_to_keep=t.keep_checkpoints or None)
    resumed_from = 0
    latest = tf.train.latest_checkpoint(str(out_dir / TRAIN_STATE_DIR))
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        resumed_from = int(step_var.numpy())
        # The learning rate of the config wins over the stored one (a resumed sweep may change it).
        optimizer.learning_rate.assign(config.optimizer.learning_rate)
        logger.info("resumed from %s at step %d", latest, resumed_from)
    elif t.init_checkpoint:
        _init_weights(model, config)
    else:
        glorot_init(model, t.seed)
    return model, optimizer, step_var, checkpoint, manager, resumed_from


class _Clock:
    """Training time. CPU seconds count from the run's first start (a resumed run carries on its
    earlier CPU time) and leave out the evaluations done in this process; the deadline
    (`max_minutes`) moves with those pauses too, since evaluating is not training."""

    def __init__(self, resumed_cpu_seconds: float, max_minutes: float) -> None:
        self.cpu_start = time.process_time() - resumed_cpu_seconds
        self.run_start = time.perf_counter()
        # The time budget is for training; reading volumes and partitions come before it.
        self.deadline = self.run_start + 60.0 * max_minutes if max_minutes > 0 else None

    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_start

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.run_start

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def leave_out(self, wall: float, cpu: float) -> None:
        self.cpu_start += cpu
        if self.deadline is not None:
            self.deadline += wall


class _SummaryWindow:
    """The losses and steps since the last summary line; throughput counts training only, so a
    validation or evaluation pause is taken out of the window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.start, self.steps = time.perf_counter(), 0

    def add(self, loss: float) -> None:
        self.losses.append(loss)
        self.steps += 1

    def leave_out(self, seconds: float) -> None:
        self.start += seconds

    def steps_per_second(self) -> float:
        return self.steps / max(time.perf_counter() - self.start, 1e-9)


class _Milestones:
    """The checkpoints to keep whatever `keep_checkpoints` says: at the steps and at the CPU
    minutes the config names (those not yet passed by a resumed run)."""

    def __init__(self, config: TrainConfig, resumed_from: int, cpu_seconds: float) -> None:
        t = config.training
        self.steps_due = [m for m in t.checkpoint_at_steps if m > resumed_from]
        self.cpu_due = [m * 60.0 for m in t.checkpoint_at_cpu_minutes if m * 60.0 > cpu_seconds]

    def due(self, step: int, cpu_seconds: float, agree) -> str | None:
        """Why a milestone is kept at `step`, or None. `agree` ORs a time-based decision across a
        multi-worker job's replicas (they must save at the same step)."""
        milestone = None
        if self.steps_due and step >= self.steps_due[0]:
            milestone = f"step {self.steps_due.pop(0)}"
        if self.cpu_due and agree(cpu_seconds >= self.cpu_due[0])[0]:
            milestone = f"{self.cpu_due.pop(0) / 60:g} CPU minutes"
        return milestone


def _agreement(strategy, multi_worker: bool):
    """agree(*flags) -> flags OR-ed across every replica of a multi-worker job (they must stop
    and save at the same step: both involve collectives); as they are for one worker."""
    import tensorflow as tf

    def agree(*flags: bool) -> list[bool]:
        if not multi_worker:
            return list(flags)
        value = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant([int(f) for f in flags], tf.int32))
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None).numpy()
        return [bool(v > 0) for v in total]

    return agree


@dataclass
class _Saver:
    """Writes the run's state: the resumable checkpoint, the exported model and, for a milestone,
    a kept weights checkpoint with its line in `milestones.jsonl`."""

    config: TrainConfig
    model: object
    manager: object
    step_var: object
    write_dir: Path
    clock: _Clock

    @property
    def milestones_dir(self) -> Path:
        return self.write_dir / MILESTONES_DIR

    def save(self, milestone: str | None = None) -> None:
        import tensorflow as tf

        from ..checkpoint import save_network

        step = int(self.step_var.numpy())
        self.manager.save(checkpoint_number=step)
        # A model chosen by `train summary` stays; the latest weights then go beside it.
        chosen = (self.write_dir / MODEL_DIR / "selection.json").is_file()
        save_network(self.model, self.write_dir / ("last_model" if chosen else MODEL_DIR), model_config_of(self.config))
        if milestone:
            self.milestones_dir.mkdir(parents=True, exist_ok=True)
            # Kept whatever keep_checkpoints says: a plain weights checkpoint per milestone.
            tf.train.Checkpoint(weights=self.model.weights, biases=self.model.biases, step=self.step_var).write(
                str(self.milestones_dir / f"ckpt-{step}"))
            with open(self.milestones_dir / "milestones.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "why": milestone, "cpu_seconds": round(self.clock.cpu_seconds(), 1),
                                    "wall_seconds": round(self.clock.wall_seconds(), 1)}) + "\n")


def _hand_over(config: TrainConfig, out_dir: Path, milestones_dir: Path, step: int, on_evaluation_checkpoint) -> None:
    """The milestone kept at `step` goes to evaluation: to the callback (which enqueues it), or,
    with neither callback nor queue, evaluated here."""
    prefix = str(milestones_dir / f"ckpt-{step}")
    if on_evaluation_checkpoint is not None:
        on_evaluation_checkpoint(out_dir, step, prefix)
    elif config.evaluation.queue:
        logger.warning("step %d: checkpoint kept for evaluation; enqueue it with `exaconnect train evaluate "
                       "%s --queue %s` (train() was given no enqueue callback)", step, out_dir, config.evaluation.queue)
    else:
        from .evaluation import evaluate_checkpoint

        evaluate_checkpoint(out_dir, step, prefix)


def train(config: TrainConfig, example_source: ExampleSource | None = None,
          validation_source: ExampleSource | None = None, strategy=None,
          on_evaluation_checkpoint=None) -> TrainResult:
    """Trains (or resumes, or fine-tunes) an FFN as `config` says; returns where the model is.

    A run writes into `training.out_dir`: `config.yaml`, `train_state/` (checkpoints with the
    optimizer state, for resuming), `model/` (the latest weights, loadable by inference; once
    `exaconnect train summary` has exported a chosen checkpoint there, the latest go to
    `last_model/`), `milestones/` (kept checkpoints), `metrics.jsonl`, `tensorboard/` and
    `training.png`.

    Every `evaluation.every_steps` a checkpoint is kept and handed to
    `on_evaluation_checkpoint(run_dir, step, prefix)` (the CLI and the queue's training task
    pass one that enqueues an evaluation task on `evaluation.queue`); without a callback and
    without a queue it is evaluated here, in this process.
    """
    quiet_tensorflow()
    import tensorflow as tf
    from tqdm import tqdm

    from .distribute import TrainStep, make_strategy
    from .monitor import MetricsLog, plot_metrics

    t = config.training
    set_tf_threads(t.intra_op_threads, t.inter_op_threads)
    if t.deterministic:
        tf.random.set_seed(t.seed)
        tf.config.experimental.enable_op_determinism()
    strategy = strategy or make_strategy(t)
    out_dir, write_dir, chief, worker_index = _run_dirs(config, strategy)
    example_source, validation_source = _example_sources(config, out_dir, example_source, validation_source)
    model, optimizer, step_var, _, manager, resumed_from = _model_and_state(config, strategy, out_dir, write_dir)

    local_batch = t.batch_size * len(strategy.extended.worker_devices)
    step_fn = TrainStep(strategy, model, optimizer, t.batch_size)
    rng = np.random.default_rng([t.seed, resumed_from, worker_index])
    feeder = BatchFeeder(example_source, config, local_batch, rng, augment=True)
    log = MetricsLog(out_dir, enabled=chief)
    # Validation batches shrink as walks finish; one relaxed trace serves every size.
    forward = tf.function(model._forward, reduce_retracing=True)

    def predict(seeds: np.ndarray, images: np.ndarray) -> np.ndarray:
        return forward(tf.constant(images[..., None]), tf.constant(seeds[..., None])).numpy()[..., 0]

    agree = _agreement(strategy, t.strategy == "multi_worker")
    clock = _Clock(_resumed_cpu_seconds(out_dir), t.max_minutes)
    saver = _Saver(config, model, manager, step_var, write_dir, clock)
    milestones = _Milestones(config, resumed_from, clock.cpu_seconds())
    window = _SummaryWindow()
    evaluate_every = config.evaluation.every_steps
    step, steps_run = resumed_from, 0
    last_save_time = time.perf_counter()
    last_loss = float("nan")
    validation: dict[str, float] = {}
    show = t.progress and chief
    on_terminal = show and sys.stderr.isatty()
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=not on_terminal)
    lines = ProgressLines(t.max_steps, step, t.progress_every_steps, clock.deadline) if show and not on_terminal else None
    try:
        while step < t.max_steps:
            if clock.deadline is not None and agree(clock.past_deadline())[0]:
                break
            seeds, images, targets, weights = feeder.next()
            loss, logits = step_fn(seeds, images, targets, weights)
            feeder.update(logits)
            step += 1
            steps_run += 1
            step_var.assign(step)
            last_loss = loss
            window.add(loss)
            bar.update(1)
            if lines is not None:
                lines.update(step, last_loss)
            if step % t.summary_every_steps == 0:
                rate = window.steps_per_second()
                values = {"loss": float(np.mean(window.losses)), "steps_per_second": rate,
                          "examples_per_second": rate * step_fn.global_batch,
                          "learning_rate": float(optimizer.learning_rate.numpy()),
                          "examples_started": feeder.examples_started,
                          "cpu_seconds": clock.cpu_seconds(), "wall_seconds": clock.wall_seconds()}
                log.write(step, "train", values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{values['examples_per_second']:.2f}")
                window.reset()
            if validation_source is not None and step % t.validation_every_steps == 0:
                paused = time.perf_counter()
                validation = validation_metrics(predict, validation_source, config, t.validation_examples)
                log.write(step, "validation", validation)
                if chief:
                    plot_metrics(out_dir)
                window.leave_out(time.perf_counter() - paused)
            now = time.perf_counter()
            milestone = milestones.due(step, clock.cpu_seconds(), agree)
            evaluate_now = bool(evaluate_every) and step % evaluate_every == 0
            if evaluate_now and not milestone:
                milestone = "evaluation"
            if milestone or step % t.checkpoint_every_steps == 0 or \
                    agree(now - last_save_time >= t.checkpoint_every_seconds)[0]:
                saver.save(milestone)
                last_save_time = now
            if evaluate_now and chief:
                paused, cpu_paused = time.perf_counter(), time.process_time()
                _hand_over(config, out_dir, saver.milestones_dir, step, on_evaluation_checkpoint)
                pause = time.perf_counter() - paused
                window.leave_out(pause)
                clock.leave_out(pause, time.process_time() - cpu_paused)
    finally:
        bar.close()
    if steps_run or not (write_dir / MODEL_DIR).is_dir():
        saver.save()
    if validation_source is not None and steps_run and step % t.validation_every_steps != 0:
        validation = validation_metrics(predict, validation_source, config, t.validation_examples)
        log.write(step, "validation", validation)
    if chief:
        plot_metrics(out_dir)
    seconds = clock.wall_seconds()
    return TrainResult(out_dir, write_dir / MODEL_DIR, step, resumed_from, steps_run, seconds,
                       steps_run * step_fn.global_batch / max(seconds, 1e-9), last_loss, validation)
