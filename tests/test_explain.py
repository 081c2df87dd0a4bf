"""catdog.explain: class activation maps on every architecture, their faithfulness on real photos, predict
--explain (exported folder and registered model), and the activations/filters figures of `catdog explain`."""

from __future__ import annotations

import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_predict import catdog, json_lines

from catdog import cli
from catdog.core.params import EvaluateParams
from catdog.data.images import decode_image, resize
from catdog.explain.cam import CAM_METHODS, TARGET_LAYERS, activation_maps, target_layer
from catdog.explain.evaluation import most_confused
from catdog.explain.faithfulness import deletion_test
from catdog.models.architectures import ARCHITECTURES
from catdog.models.factory import create_model
from catdog.models.linear_probe import fit_logistic_head

from conftest import REPO_ROOT, jpeg_bytes

SAMPLE_ZIP = REPO_ROOT / "data" / "sample" / "dogs-vs-cats-sample.zip"


def test_every_arch_has_a_target_layer_and_every_method_a_param_name():
    assert set(TARGET_LAYERS) == set(ARCHITECTURES)
    assert set(typing.get_args(EvaluateParams.model_fields["cam_method"].annotation)) == set(CAM_METHODS)


# one arch per family of catdog.models.architectures (torchvision's `features` nets: two of four)
@pytest.mark.parametrize(
    "arch", ["efficientnet_lite0", "resnet18", "mobilenet_v3_large", "convnext_tiny", "simple_cnn"]
)
def test_maps_come_from_a_layer_forward_runs_on_every_family(arch):
    model = create_model(arch, pretrained=False, num_classes=3, image_size=64).eval()
    model.requires_grad_(False)  # a frozen (features-mode) model: the maps enable what they need themselves
    calls = []
    target_layer(model, arch).register_forward_hook(lambda *_: calls.append(1))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as evaluate and predict run: gradients are on for the maps alone
        maps = activation_maps(model, arch, images, [0, 2])
        assert not torch.is_grad_enabled()
    assert calls, f"{TARGET_LAYERS[arch]} never ran in forward()"
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert not any(w.requires_grad or w.grad is not None for w in model.parameters())  # as they were, no grads


def test_most_confused_pairs_largest_first_with_the_share_of_the_true_class():
    matrix = np.array([[5, 3, 0], [1, 8, 1], [0, 3, 2]])
    rows = most_confused(matrix, ["a", "b", "c"])
    assert [(r["true"], r["predicted"], r["count"]) for r in rows] == [
        ("c", "b", 3),  # 3 of 5: a larger share than a -> b's 3 of 8
        ("a", "b", 3),
        ("b", "a", 1),
        ("b", "c", 1),
    ]
    assert rows[0]["share"] == pytest.approx(0.6) and rows[1]["share"] == pytest.approx(3 / 8)
    assert most_confused(np.eye(2, dtype=int) * 4, ["a", "b"]) == []


# --- a model trained on real photos: Lite0 features + the logistic head, in seconds -------------------------


@pytest.fixture(scope="module")
def photo_model():
    """Lite0 (ImageNet weights) with a logistic head fitted on 48 of the sample zip's real photos at 128 px;
    returns (model, the 24 held-out images as model input)."""
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        per_class = [[n for n in names if Path(n).name.startswith(f"{c}.")][:36] for c in ("cat", "dog")]
        files = [name for pair in zip(*per_class) for name in pair]
        pixels = np.stack([resize(decode_image(archive.read(f), 128), 128) for f in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    labels = torch.tensor([0 if Path(f).name.startswith("cat.") else 1 for f in files])
    model = create_model("efficientnet_lite0", image_size=128).eval()
    with torch.inference_mode():
        features = model.embed(images[:48])
    fit_logistic_head(model.head, features, labels[:48], c=0.01)
    return model, images[48:], labels[48:]


def test_greying_the_most_salient_pixels_costs_more_than_random_ones(photo_model):
    model, held_out, labels = photo_model
    with torch.inference_mode():
        assert (model(held_out).argmax(1) == labels).float().mean() >= 0.8  # a model worth explaining
    deletion = deletion_test(model, "efficientnet_lite0", held_out)
    assert deletion.images == len(held_out)
    assert deletion.salient_drop > deletion.random_drop > 0, deletion


def test_the_random_deletion_greys_whole_cells_of_the_map_grid():
    from catdog.explain.faithfulness import CELL, _random_cells

    chosen = _random_cells(3, (100, 70), 1400, np.random.default_rng(0))  # a 4 x 3 grid, the edge cells cut
    assert chosen.shape == (3, 1400) and all(len(set(row)) == 1400 for row in chosen)
    cell_of_pixel = (np.arange(100)[:, None] // CELL * 3 + np.arange(70)[None, :] // CELL).ravel()
    sizes = np.bincount(cell_of_pixel)
    for row in chosen:
        taken = np.bincount(cell_of_pixel[row], minlength=len(sizes))
        assert ((taken == 0) | (taken == sizes)).sum() >= len(sizes) - 1, taken  # whole cells, the last one cut


# --- catdog predict --explain ---------------------------------------------------------------------------------


def check_explained(results: list[dict], size: int) -> None:
    for result in results:
        explanation = result["explanation"]
        overlay, heatmap = Image.open(explanation["overlay"]), np.load(explanation["map"])
        assert overlay.size == (size, size) and overlay.mode == "RGB"
        assert heatmap.shape == (size, size) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0 and heatmap.max() <= 1 and heatmap.max() > heatmap.min()


def test_predict_explain_writes_an_overlay_and_the_raw_map_per_file(pipeline, tmp_path):
    for name, index in (("dog", 600), ("cat", 601)):
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / "photo.jpg").write_bytes(jpeg_bytes(name, index))  # the same stem twice
    model = str(pipeline.paths.exported / "model.onnx")
    out = tmp_path / "maps"
    proc = catdog("predict", str(tmp_path / "in"), "--model", model, "--explain", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json_lines(proc.stdout)
    assert [Path(r["explanation"]["overlay"]).name for r in results] == ["photo.png", "photo_2.png"]
    assert sorted(p.name for p in out.iterdir()) == ["photo.npy", "photo.png", "photo_2.npy", "photo_2.png"]
    check_explained(results, pipeline.params.train.image_size)

    cat_maps = str(tmp_path / "cat-maps")
    forced = catdog("predict", str(tmp_path / "in"), "--model", model, "--explain", cat_maps, "--explain-class", "cat")
    assert forced.returncode == 0, forced.stderr
    said_dog = [i for i, r in enumerate(results) if r["label"] == "dog"]
    assert said_dog  # in/dog/photo.jpg
    for i, (top, cat) in enumerate(zip(results, json_lines(forced.stdout))):
        same = np.allclose(np.load(top["explanation"]["map"]), np.load(cat["explanation"]["map"]))
        assert same == (i not in said_dog)  # a photo said to be a dog gets another map for class cat

    unknown = catdog("predict", str(tmp_path / "in"), "--model", model, "--explain", str(out), "--explain-class", "x")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.strip().splitlines() == [
        "catdog: error: unknown --explain-class 'x': the model's classes are ['cat', 'dog']"
    ]


def test_predict_explain_with_a_registered_model(pipeline, tmp_path):
    image = tmp_path / "dog.jpg"
    image.write_bytes(jpeg_bytes("dog", 610))
    out = tmp_path / "maps"
    proc = catdog("predict", str(image), "--model", "models:/catdog@champion", "--explain", str(out), cwd=pipeline.root)
    assert proc.returncode == 0, proc.stderr
    (result,) = json_lines(proc.stdout)
    assert Path(result["explanation"]["map"]) == out / "dog.npy"
    check_explained([result], pipeline.params.train.image_size)


# --- catdog explain activations / filters ---------------------------------------------------------------------


def assert_a_real_figure(path: Path, min_bytes: int) -> None:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert path.stat().st_size > min_bytes and pixels.std() > 10, path


def test_explain_activations_and_filters_write_figures(pipeline, tmp_path, monkeypatch, capsys):
    """In process (cli.main, as the console script runs it): the views' imports cost seconds per subprocess."""
    image = tmp_path / "cat.jpg"
    image.write_bytes(jpeg_bytes("cat", 620))
    checkpoint = str(pipeline.paths.checkpoint)
    assert cli.main(["explain", "activations", str(image), "--model", checkpoint, "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "activations-cat.png")
    assert_a_real_figure(tmp_path / "out" / "activations-cat.png", 20_000)

    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(project / "sub")
    filters = ["explain", "filters", "--model", checkpoint, "--steps", "3", "--size", "48", "--channels", "2"]
    assert cli.main(filters) == 0
    assert capsys.readouterr().out.strip() == str(project / "reports" / "explain" / "filters.png")  # the default --out
    assert_a_real_figure(project / "reports" / "explain" / "filters.png", 20_000)

    assert cli.main(["explain", "activations", str(tmp_path / "nope.jpg"), "--model", checkpoint]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
