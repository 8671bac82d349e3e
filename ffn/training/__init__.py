"""FFN training: config (YAML dataclasses), data (examples from layers, partitions), augment,
loop (FOV movement, loss, checkpoints), distribute (mirrored / multi-worker), monitor (curves,
TensorBoard), sweep (hyperparameter grids), demo (the small deterministic demo model)."""
