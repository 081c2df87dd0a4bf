"""params.yaml -> typed, frozen, validated Params."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from catdog.core.errors import CatdogError
from catdog.core.params import Params, ParamsError, load_params, parse_params
from catdog.models.architectures import ARCHITECTURES

from conftest import REPO_PARAMS, repo_params_raw


def with_value(key: str, value) -> dict:
    raw = repo_params_raw()
    section, name = key.split(".")
    raw[section][name] = value
    return raw


def test_repo_params_load_with_their_values():
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    assert params.data.source == "data/sample/dogs-vs-cats-sample.zip"
    assert params.data.cache_size == 260
    assert params.data.limit_per_class is None
    assert params.data.labels is None and params.data.classes is None
    assert params.data.max_image_bytes == 50_000_000
    assert params.train.arch == "efficientnet_lite2"
    assert params.train.mode == "features"
    assert params.train.weights is None
    assert params.train.lr == 0.003 and isinstance(params.train.lr, float)
    assert params.train.pretrained is True
    assert params.export.opset == 18
    assert params.tracking.experiment_name == "catdog"


def test_params_are_frozen():
    params = load_params(REPO_PARAMS)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        params.train.lr = 0.1  # type: ignore[misc]


def test_params_error_is_a_catdog_error():
    assert issubclass(ParamsError, CatdogError)


def test_unknown_top_level_key_is_rejected_by_name():
    raw = repo_params_raw()
    raw["trian"] = {"lr": 0.1}
    with pytest.raises(ParamsError, match=r"unknown key trian\b"):
        parse_params(raw)


def test_unknown_key_in_section_is_rejected_with_its_dotted_name():
    with pytest.raises(ParamsError, match=r"unknown key train\.learning_rate\b") as info:
        parse_params(with_value("train.learning_rate", 0.1))
    assert "lr" in str(info.value)  # lists the known keys of the section


def test_error_message_names_the_source_file():
    with pytest.raises(ParamsError, match=r"^my-params\.yaml: "):
        parse_params(with_value("train.epochs", "ten"), source="my-params.yaml")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train.epochs", "ten", r"train\.epochs must be a valid integer, got 'ten'"),
        ("train.epochs", True, r"train\.epochs must be a valid integer, got True"),
        ("train.epochs", 2.5, r"train\.epochs must be a valid integer, got 2\.5"),
        ("train.pretrained", 1, r"train\.pretrained must be a valid boolean, got 1"),
        ("train.pretrained", "yes", r"train\.pretrained must be a valid boolean"),
        ("data.cache_size", None, r"data\.cache_size must be a valid integer, got None"),
        ("train.lr", "fast", r"train\.lr must be a valid number, got 'fast'"),
        ("train.lr", False, r"train\.lr must be a valid number, got False"),
        ("tracking.experiment_name", 7, r"tracking\.experiment_name must be a valid string, got 7"),
        ("train.mode", "finetune", r"train\.mode must be 'features', 'head', 'top' or 'full', got 'finetune'"),
        ("train.precision", "fp16", r"train\.precision must be 'auto', 'fp32' or 'bf16', got 'fp16'"),
        ("train.monitor", "accuracy", r"train\.monitor must be 'val_loss' or 'val_accuracy'"),
        ("train.head", "linear", r"train\.head must be 'auto', 'gradient' or 'logistic', got 'linear'"),
        ("train.logistic_c", "best", r"train\.logistic_c must be 'auto' or > 0, got 'best'"),
        ("train.logistic_c", True, r"train\.logistic_c must be 'auto' or > 0, got True"),
        ("train.logistic_c", 0, r"train\.logistic_c must be 'auto' or > 0, got 0"),
    ],
)
def test_wrong_type_is_rejected(key, value, expected):
    with pytest.raises(ParamsError, match=expected):
        parse_params(with_value(key, value))


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train.lr", -1, r"train\.lr must be greater than 0, got -1"),
        ("train.lr", 0, r"train\.lr must be greater than 0, got 0"),
        ("train.epochs", 0, r"train\.epochs must be greater than or equal to 1, got 0"),
        ("train.dropout", 1.0, r"train\.dropout must be less than 1, got 1\.0"),
        ("train.image_size", 16, r"train\.image_size must be greater than or equal to 32, got 16"),
        ("train.arch", "resnet9000", r"train\.arch must be one of"),
        ("data.cache_size", 31, r"data\.cache_size must be greater than or equal to 32"),
        ("data.val_fraction", 0, r"data\.val_fraction must be greater than 0, got 0"),
        ("data.test_fraction", 1.0, r"data\.test_fraction must be less than 1, got 1\.0"),
        ("data.limit_per_class", 0, r"data\.limit_per_class must be greater than 0, got 0"),
        ("data.min_per_class", 0, r"data\.min_per_class must be greater than or equal to 3"),
        ("data.workers", -1, r"data\.workers must be greater than or equal to 0, got -1"),
        ("data.max_image_bytes", 0, r"data\.max_image_bytes must be greater than or equal to 1, got 0"),
        ("data.classes", ["cat"], r"data\.classes must name at least two classes, got \['cat'\]"),
        ("data.classes", ["cat", "cat"], r"data\.classes must not repeat a name"),
        ("data.classes", ["cat", " "], r"data\.classes must not hold empty names"),
        ("data.classes", "cat,dog", r"data\.classes must be a valid list"),
        ("data.classes", ["cat", 7], r"data\.classes must be a valid string, got 7"),
        ("data.labels", 7, r"data\.labels must be a valid string, got 7"),
        ("export.opset", 16, r"export\.opset must be greater than or equal to 17"),
        ("export.tolerance", 0, r"export\.tolerance must be greater than 0"),
        ("export.precision", ["int8", "int8"], r"export\.precision must not repeat a precision"),
        ("export.precision", ["fp16"], r"export\.precision must be 'int8' or 'bf16', got 'fp16'"),
        ("export.variant_min_agreement", 1.5, r"export\.variant_min_agreement must be less than or equal to 1"),
        ("evaluate.batch_size", 0, r"evaluate\.batch_size must be greater than or equal to 1"),
        ("tracking.experiment_name", "  ", r"tracking\.experiment_name must not be empty"),
    ],
)
def test_bad_value_is_rejected(key, value, expected):
    with pytest.raises(ParamsError, match=expected):
        parse_params(with_value(key, value))


@pytest.mark.parametrize("val, test", [(0.45, 0.45), (0.5, 0.4), (0.3, 0.7)])
def test_fractions_must_leave_training_data(val, test):
    raw = with_value("data.val_fraction", val)
    raw["data"]["test_fraction"] = test
    with pytest.raises(ParamsError, match=r"data\.val_fraction \+ data\.test_fraction must leave at least 10%"):
        parse_params(raw)


def test_fractions_just_below_the_limit_are_fine():
    raw = with_value("data.val_fraction", 0.4)
    raw["data"]["test_fraction"] = 0.4
    params = parse_params(raw)
    assert (params.data.val_fraction, params.data.test_fraction) == (0.4, 0.4)


def test_unknown_arch_message_lists_the_choices():
    with pytest.raises(ParamsError) as info:
        parse_params(with_value("train.arch", "resnet9000"))
    for arch in ARCHITECTURES:
        assert arch in str(info.value)


def test_features_mode_with_augment_is_rejected():
    raw = with_value("train.augment", True)
    raw["train"]["mode"] = "features"
    with pytest.raises(ParamsError, match=r"train\.augment must be false in 'features' mode"):
        parse_params(raw)


@pytest.mark.parametrize("mode", ["head", "full"])
def test_augment_is_fine_outside_features_mode(mode):
    raw = with_value("train.augment", True)
    raw["train"]["mode"] = mode
    params = parse_params(raw)
    assert params.train.augment is True and params.train.mode == mode


def test_scientific_notation_string_is_accepted_as_float(tmp_path):
    text = REPO_PARAMS.read_text().replace("lr: 0.003", "lr: 3e-3").replace("tolerance: 0.001", "tolerance: 5e-4")
    assert "lr: 3e-3" in text and "tolerance: 5e-4" in text
    assert yaml.safe_load(text)["train"]["lr"] == "3e-3"  # what YAML 1.1 actually gives us
    file = tmp_path / "params.yaml"
    file.write_text(text)
    params = load_params(file)
    assert params.train.lr == pytest.approx(0.003) and isinstance(params.train.lr, float)
    assert params.export.tolerance == pytest.approx(5e-4)


def test_int_is_accepted_for_float():
    params = parse_params(with_value("train.lr", 1))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_optional_values_accept_null_and_their_type():
    params = parse_params(with_value("data.limit_per_class", 100))
    assert params.data.limit_per_class == 100
    assert parse_params(with_value("data.labels", "labels.csv")).data.labels == "labels.csv"
    assert parse_params(with_value("data.classes", ["dog", "Snow Owl", "cat"])).data.classes == [
        "dog",
        "Snow Owl",
        "cat",
    ]
    params = parse_params(with_value("train.weights", "weights/resnet18.pth"))
    assert params.train.weights == "weights/resnet18.pth"
    with pytest.raises(ParamsError, match=r"data\.limit_per_class must be a valid integer"):
        parse_params(with_value("data.limit_per_class", "all"))


def test_every_key_is_required_params_yaml_is_the_only_source():
    raw = repo_params_raw()
    del raw["train"]["epochs"]
    del raw["evaluate"]["tta"]
    with pytest.raises(ParamsError, match=r"missing required key train\.epochs; missing required key evaluate\.tta"):
        parse_params(raw)


def test_missing_required_key_is_rejected():
    raw = repo_params_raw()
    del raw["data"]["source"]
    with pytest.raises(ParamsError, match=r"missing required key data\.source"):
        parse_params(raw)


def test_missing_section_is_rejected():
    raw = repo_params_raw()
    del raw["export"]
    with pytest.raises(ParamsError, match=r"missing required key export\b"):
        parse_params(raw)


def test_section_that_is_not_a_mapping_is_rejected():
    raw = repo_params_raw()
    raw["train"] = ["lr", 0.1]
    with pytest.raises(ParamsError, match=r"train must be a mapping"):
        parse_params(raw)


def test_missing_file_raises_params_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match=r"nope\.yaml not found"):
        load_params(missing)


def test_invalid_yaml_raises_params_error(tmp_path):
    file = tmp_path / "params.yaml"
    file.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=r"is not valid YAML"):
        load_params(file)


def test_empty_file_reports_the_missing_section(tmp_path):
    file = tmp_path / "params.yaml"
    file.write_text("")
    with pytest.raises(ParamsError, match=r"missing required key data"):
        load_params(file)


def test_flat_of_one_section():
    params = load_params(REPO_PARAMS)
    flat = params.flat("train")
    expected = {f"train.{name}" for name in type(params.train).model_fields}
    assert set(flat) == expected
    assert {"train.lr", "train.epochs", "train.arch", "train.mode", "train.weights"} <= set(flat)
    assert flat["train.lr"] == 0.003
    assert flat["train.weights"] is None


def test_flat_of_several_and_all_sections():
    params = load_params(REPO_PARAMS)
    both = params.flat("evaluate", "export")
    assert set(both) == {
        f"{section}.{name}"
        for section in ("evaluate", "export")
        for name in type(getattr(params, section)).model_fields
    }
    assert {"evaluate.batch_size", "export.opset", "export.tolerance"} <= set(both)
    assert not any(key.startswith(("train.", "data.")) for key in both)
    every = params.flat()
    assert {key.split(".")[0] for key in every} == {"data", "audit", "train", "evaluate", "export", "tracking"}
    assert every["data.seed"] == 42 and every["tracking.experiment_name"] == "catdog"


def test_head_auto_is_the_logistic_head_in_features_mode_and_the_gradient_head_elsewhere():
    default = parse_params(repo_params_raw()).train
    assert (default.head, default.logistic_c, default.mode) == ("auto", "auto", "features")
    fitted = parse_params(with_value("train.logistic_c", "1e-2")).train.resolved()
    assert (fitted.head, fitted.epochs, fitted.logistic_c) == ("logistic", 1, 0.01)  # fitted once
    for mode in ("head", "top", "full"):
        resolved = parse_params(with_value("train.mode", mode)).train.resolved()
        assert (resolved.head, resolved.epochs) == ("gradient", default.epochs)
    explicit = parse_params(with_value("train.head", "gradient")).train
    assert explicit.resolved() is explicit
