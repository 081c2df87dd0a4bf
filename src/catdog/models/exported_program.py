"""torch.export programs cached by the model's structure, not its weights: tracing Lite2 takes
seconds on a CPU, and every trial of a study traces the same architecture again with other weights.

A program is traced once per structure (torch version, the modules' classes and their source, the
input shape, every tensor's name, shape and dtype) into ``$CATDOG_CACHE/pt2/<hash>.pt2``; each export
loads it and copies the model's weights in. Hit or miss, the program returned is the loaded one, so the
file export writes has the same bytes either way. export's parity check compares it with eager PyTorch.
"""

from __future__ import annotations

import hashlib
import inspect

import torch

from catdog.core import atomic
from catdog.core.paths import cache_root

PROGRAM_VERSION = 1  # bump when how programs are traced changes


def export_program(model: torch.nn.Module, example: torch.Tensor, dynamic_shapes: dict) -> torch.export.ExportedProgram:
    """``torch.export.export(model, (example,), dynamic_shapes=...)`` with ``model``'s weights, from the
    cache when a model of the same structure was traced before."""
    model.eval()
    path = cache_root() / "pt2" / f"{structure_hash(model, example, dynamic_shapes)}.pt2"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
        for node in program.graph.nodes:  # stack traces name this machine's source paths
            node.meta.pop("stack_trace", None)
        with atomic.replacing(path) as temporary, temporary.open("wb") as handle:
            torch.export.save(program, handle)
    program = torch.export.load(str(path))
    _copy_weights(model, program)
    return program


def structure_hash(model: torch.nn.Module, example: torch.Tensor, dynamic_shapes: dict) -> str:
    """What the traced graph depends on, weights aside."""
    classes = sorted({type(module) for module in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}")
    identity = (PROGRAM_VERSION, torch.__version__, tuple(example.shape[1:]), str(dynamic_shapes), repr(model))
    digest = hashlib.sha256(repr(identity).encode())
    for cls in classes:
        digest.update(_source(cls).encode())
    state = model.state_dict()
    for name, tensor in state.items():
        digest.update(repr((name, tuple(tensor.shape), str(tensor.dtype))).encode())
    for name, buffer in model.named_buffers():  # non-persistent buffers are constants of the program
        if name not in state:
            digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def _copy_weights(model: torch.nn.Module, program: torch.export.ExportedProgram) -> None:
    state = model.state_dict()
    missing = set(program.state_dict) - set(state)
    if missing:
        raise RuntimeError(f"cached program {sorted(missing)[:3]} has tensors the model lacks")
    for name, tensor in program.state_dict.items():
        tensor.copy_(state[name])


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # built in: its version is torch's
        return cls.__qualname__
