"""Multi-process training under torchrun: one DDP process per GPU (gloo processes on a CPU).

``train.nproc > 1`` makes the train stage re-launch itself with
``python -m torch.distributed.run --standalone --nproc_per_node=N``; a multi-node job starts the
stage under torchrun itself (docs/training.md: "Multi-GPU and multi-node"). Every rank trains; rank 0 alone
validates, logs to MLflow and writes files.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from catdog.core.errors import CatdogError
from catdog.core.params import Params


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; a lone process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_replicas_agree(self, module: torch.nn.Module) -> None:
        """DDP keeps every rank's weights equal; a layer trained outside it would drift apart silently."""
        if not self.distributed:
            return
        checksums = self.gather(sum(float(w.detach().double().sum()) for w in module.parameters()))
        if len(set(checksums)) > 1:
            raise CatdogError(f"the DDP replicas' weights differ (checksums {checksums}): a bug, please report it")

    def gather(self, value) -> list:
        """Every rank's ``value`` in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def joined() -> Iterator[World]:
    """This process's World; with more than one process the process group (nccl on CUDA, else
    gloo) lives for the block."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield World()
        return
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)  # before the group: nccl binds to the current device
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield world
    finally:
        dist.destroy_process_group()


def relaunch(nproc: int, params: Params, root: Path) -> None:
    """Run the train stage in ``nproc`` processes on this machine under torchrun; returns once all
    of them succeeded. The params travel in a temporary file: the caller's may not be on disk."""
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise CatdogError(f"train.nproc is {nproc} but this machine has {torch.cuda.device_count()} GPU(s)")
    with tempfile.TemporaryDirectory(prefix="catdog-train-") as folder:
        params_file = Path(folder) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "catdog.pipeline.train",
            "--params",
            str(params_file),
            "--root",
            str(root),
        ]
        returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise CatdogError(
            f"torchrun with {nproc} processes exited with code {returncode} (the ranks' errors are above)"
        )
