"""A lab's own stage, kept outside exaconnect's folders and registered the way a lab would
(EXACONNECT_PLUGINS=lab_synapses, or an entry point in the group `exaconnect.stages`): it
counts the voxels of each object of a segmentation and writes them as JSON. Used by
tests/services/test_stage_registry.py to show that one module adds a stage everywhere."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from taskqueue import RegisteredTask

from exaconnect.services.stages import (PipelineSection, Stage, StageCommand, layer_argument, register_command,
                                        register_section)


class CountVoxelsTask(RegisteredTask):
    def __init__(self, layer: str, out: str, min_voxels: int):
        super().__init__(layer, out, min_voxels)

    def execute(self) -> None:
        import numpy as np

        from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

        vol = open_layer(self.layer)
        labels = read_box(vol, layer_bounds(vol))
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        kept = {str(int(i)): int(c) for i, c in zip(ids, counts) if c >= self.min_voxels}
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        with open(self.out + ".tmp", "w") as f:
            json.dump(kept, f)
        os.replace(self.out + ".tmp", self.out)


@dataclass(frozen=True)
class CountVoxels(Stage):
    service: ClassVar[str] = "synapse"
    stage_name: ClassVar[str] = "synapse.count"
    layer: str
    out: str
    min_voxels: int = 1

    # `upstream=` (what must be complete first) and `name=` come with the Stage base class.
    def make_tasks(self) -> list:
        return [CountVoxelsTask(self.layer, self.out, self.min_voxels)]


@dataclass(frozen=True)
class SynapseSection:
    enabled: bool = False
    min_voxels: int = 1


def _plan(config: SynapseSection, context) -> None:
    if "segmentation" in context.layers:
        context.add(CountVoxels(layer=context.layers["segmentation"], out=f"{context.output[len('file://'):]}/counts.json",
                                min_voxels=config.min_voxels, upstream=context.requires("segmentation")))


def _arguments(parser) -> None:
    parser.add_argument("layer", type=layer_argument)
    parser.add_argument("out")
    parser.add_argument("--min-voxels", type=int, default=1)


register_section(PipelineSection("synapses", SynapseSection, _plan, order=65))
register_command(StageCommand("synapse", "count voxels per object (a lab's stage)", _arguments,
                              lambda a: [CountVoxels(layer=a.layer, out=os.path.abspath(a.out), min_voxels=a.min_voxels)],
                              ("count",)))
