"""catdog.models.exported_program: a torch.export program traced once per structure, the weights of
each model copied in; the file saved is the same whether the cache had it or not."""

from __future__ import annotations

import io

import torch

from catdog.models.exported_program import export_program, structure_hash
from catdog.models.factory import create_model

DYNAMIC = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
EXAMPLE = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def model(seed: int, classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("simple_cnn", pretrained=False, image_size=32, num_classes=classes).eval()


def saved_bytes(program) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def test_a_cached_structure_runs_each_models_own_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("CATDOG_CACHE", str(tmp_path / "cache"))
    first, second = model(1), model(2)
    batch = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        for m in (first, second):  # the first traces, the second is a cache hit
            assert torch.equal(export_program(m, EXAMPLE, DYNAMIC).module()(batch), m(batch))
    assert len(list((tmp_path / "cache" / "pt2").glob("*.pt2"))) == 1


def test_hit_and_miss_save_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("CATDOG_CACHE", str(tmp_path / "warm"))
    export_program(model(1), EXAMPLE, DYNAMIC)
    from_hit = saved_bytes(export_program(model(2), EXAMPLE, DYNAMIC))
    monkeypatch.setenv("CATDOG_CACHE", str(tmp_path / "cold"))
    assert saved_bytes(export_program(model(2), EXAMPLE, DYNAMIC)) == from_hit


def test_another_structure_is_traced_again():
    assert structure_hash(model(1), EXAMPLE, DYNAMIC) == structure_hash(model(2), EXAMPLE, DYNAMIC)
    assert structure_hash(model(1), EXAMPLE, DYNAMIC) != structure_hash(model(1, classes=3), EXAMPLE, DYNAMIC)
    assert structure_hash(model(1), EXAMPLE, DYNAMIC) != structure_hash(model(1), EXAMPLE[:, :, :16], DYNAMIC)
