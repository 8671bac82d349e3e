"""Data-parallel FFN training with tf.distribute: strategies, optimizers, the training step.

One code path serves every case: the step runs the forward pass and the gradient on each
replica (`strategy.run`), sums the replicas' gradients (`strategy.reduce`, an all-reduce
across devices and, with MultiWorkerMirroredStrategy, across nodes), and applies one update
to the mirrored variables in cross-replica context, so all replicas hold identical weights.

- 'default': one device (Intel XPU, NVIDIA GPU or CPU, chosen by `ffn.device.select_device`).
- 'mirrored': every accelerator of the node; on a CPU-only node, `logical_cpus` logical CPU
  devices (set before TensorFlow starts).
- 'multi_worker': MultiWorkerMirroredStrategy across nodes, configured by TF_CONFIG (on Aurora,
  with intel-extension-for-tensorflow installed the XPUs are the local devices).

The optimizers are written here as `tf.Module`s (TF1 update rules of the reference's
`optimizer.py`), so they behave the same on TF 2.15 and on current TF with or without Keras,
and their slots checkpoint with `tf.train.Checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from exaconnect.errors import InputError

from .config import OptimizerConfig, TrainingConfig

logger = logging.getLogger(__name__)


def configure_logical_cpus(count: int) -> None:
    """Splits the host CPU into `count` logical devices; only possible before TF initializes."""
    if count <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as exc:
        raise InputError(
            f"training.logical_cpus={count}: TensorFlow is already initialized in this process ({exc}); "
            "start a fresh process (the `exaconnect train` CLI does)") from None


def make_strategy(config: TrainingConfig) -> tf.distribute.Strategy:
    from ..device import available_devices, select_device

    if config.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    configure_logical_cpus(config.logical_cpus)
    if config.strategy == "default":
        return tf.distribute.OneDeviceStrategy(select_device(config.device))
    found = available_devices()
    kinds = ("xpu", "gpu", "cpu") if config.device == "auto" else (config.device,)
    for kind in kinds:
        if found.get(kind):
            logger.info("mirrored strategy over %s", found[kind])
            return tf.distribute.MirroredStrategy(devices=found[kind])
    raise InputError(f"training.device={config.device!r}: no devices for the mirrored strategy (found {found})")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints and summaries (task 0 of a multi-worker job)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if resolver.task_type == "chief" or ("chief" not in cluster and resolver.task_type == "worker"
                                         and resolver.task_id == 0):
        return True
    return False


def local_replica_count(strategy: tf.distribute.Strategy) -> int:
    return len(strategy.extended.worker_devices)


class Optimizer(tf.Module):
    """SGD, momentum, Adam, RMSProp or Adagrad with TF1 semantics; slots created eagerly."""

    def __init__(self, config: OptimizerConfig, variables: Sequence[tf.Variable]):
        super().__init__(name="optimizer")
        self.config = config
        self.learning_rate = tf.Variable(config.learning_rate, trainable=False, dtype=tf.float32, name="learning_rate")
        self.iterations = tf.Variable(0, trainable=False, dtype=tf.int64, name="iterations")
        self.slots_a: list[tf.Variable] = []
        self.slots_b: list[tf.Variable] = []
        name = config.name
        for v in variables:
            if name in ("momentum", "adam"):
                self.slots_a.append(tf.Variable(tf.zeros_like(v), trainable=False))
            elif name == "rmsprop":
                # TF1 RMSPropOptimizer starts the mean square at 1.
                self.slots_a.append(tf.Variable(tf.ones_like(v), trainable=False))
            elif name == "adagrad":
                # TF1 AdagradOptimizer's initial_accumulator_value.
                self.slots_a.append(tf.Variable(tf.fill(v.shape, 0.1), trainable=False))
            if name in ("adam", "rmsprop"):
                self.slots_b.append(tf.Variable(tf.zeros_like(v), trainable=False))

    def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
        c = self.config
        lr = self.learning_rate
        self.iterations.assign_add(1)
        if c.grad_clip > 0:
            grads = [tf.clip_by_value(g, -c.grad_clip, c.grad_clip) for g in grads]
        if c.name == "adam":
            t = tf.cast(self.iterations, tf.float32)
            lr = lr * tf.sqrt(1.0 - c.adam_beta2 ** t) / (1.0 - c.adam_beta1 ** t)
        for i, (g, v) in enumerate(zip(grads, variables)):
            if c.name == "sgd":
                v.assign_sub(lr * g)
            elif c.name == "momentum":
                m = self.slots_a[i]
                m.assign(c.momentum * m + g)
                v.assign_sub(lr * m)
            elif c.name == "adam":
                m, s = self.slots_a[i], self.slots_b[i]
                m.assign(c.adam_beta1 * m + (1.0 - c.adam_beta1) * g)
                s.assign(c.adam_beta2 * s + (1.0 - c.adam_beta2) * tf.square(g))
                v.assign_sub(lr * m / (tf.sqrt(s) + c.epsilon))
            elif c.name == "rmsprop":
                ms, mom = self.slots_a[i], self.slots_b[i]
                ms.assign(c.rmsprop_decay * ms + (1.0 - c.rmsprop_decay) * tf.square(g))
                mom.assign(c.momentum * mom + lr * g / tf.sqrt(ms + c.epsilon))
                v.assign_sub(mom)
            elif c.name == "adagrad":
                acc = self.slots_a[i]
                acc.assign_add(tf.square(g))
                v.assign_sub(lr * g / tf.sqrt(acc))


def ordered_variables(model) -> list[tf.Variable]:
    """Weights then biases of every layer, in a fixed order (the optimizer's slot order)."""
    names = list(model.weights)
    return [model.weights[n] for n in names] + [model.biases[n] for n in names]


class TrainStep:
    """One synchronous data-parallel step: `__call__(seeds, images, targets[, weights]) -> (loss, logits)`.

    Arrays are this worker's share of the global batch, [n, z, y, x] float32, split evenly
    over the local replicas. The loss is the mean of the per-voxel weighted sigmoid
    cross-entropy over voxels and over the global batch (so the update does not depend on how the batch is split).
    """

    def __init__(self, strategy: tf.distribute.Strategy, model, optimizer: Optimizer, per_replica_batch: int):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.per_replica = per_replica_batch
        self.global_batch = per_replica_batch * strategy.num_replicas_in_sync
        self.local_replicas = local_replica_count(strategy)
        self.variables = ordered_variables(model)
        self._step = tf.function(self._distributed_step)

    def _replica_step(self, seeds: tf.Tensor, images: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor):
        with tf.GradientTape() as tape:
            logits = self.model._forward(images, seeds)
            cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
            per_example = tf.reduce_mean(cross_entropy * weights, axis=[1, 2, 3, 4])
            loss = tf.reduce_sum(per_example) / float(self.global_batch)
        grads = tape.gradient(loss, self.variables)
        return loss, logits, grads

    def _distributed_step(self, seeds, images, targets, weights):
        loss, logits, grads = self.strategy.run(self._replica_step, args=(seeds, images, targets, weights))
        sum_ = tf.distribute.ReduceOp.SUM
        reduced = [self.strategy.reduce(sum_, g, axis=None) for g in grads]
        self.optimizer.apply(reduced, self.variables)
        return self.strategy.reduce(sum_, loss, axis=None), logits

    def distribute(self, array: np.ndarray):
        """Splits a local batch [n, z, y, x] over the local replicas, as [n/r, z, y, x, 1] each."""
        array = np.asarray(array, np.float32)[..., None]
        n = self.per_replica
        if array.shape[0] != n * self.local_replicas:
            raise InputError(f"batch of {array.shape[0]}: expected {n} per replica x {self.local_replicas} replicas")

        def value(ctx):
            local = ctx.replica_id_in_sync_group % self.local_replicas
            return tf.constant(array[local * n:(local + 1) * n])

        return self.strategy.experimental_distribute_values_from_function(value)

    def __call__(self, seeds: np.ndarray, images: np.ndarray, targets: np.ndarray,
                 weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """One step; `weights` are per-voxel loss weights like `targets` (None: all 1)."""
        if weights is None:
            weights = np.ones_like(np.asarray(targets, np.float32))
        loss, logits = self._step(self.distribute(seeds), self.distribute(images), self.distribute(targets),
                                  self.distribute(weights))
        parts = self.strategy.experimental_local_results(logits)
        return float(loss), np.concatenate([p.numpy() for p in parts])[..., 0]
