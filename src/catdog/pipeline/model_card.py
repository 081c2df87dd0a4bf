"""export's model card (MODEL_CARD.md): use, data, classes, training params, test figures, lineage,
limits. Only what the model's inputs determine, so the card is a reproducible DVC output."""

from __future__ import annotations

import json

from catdog import tracking
from catdog.core.params import Params
from catdog.core.paths import CLASSES_METADATA, LABELS_FILE, ONNX_FILE, PREPROCESS_FILE, PT2_FILE, Paths
from catdog.data import integrity


def model_card(params: Params, config: dict, test: dict, parity: dict, paths: Paths) -> str:
    """Only what the model's inputs determine: the same checkpoint, data and params give the same card
    (no run id, commit or date: the card is a DVC output, and those differ per run)."""
    summary = json.loads(paths.prepare_summary.read_text())
    classes = config["classes"]
    names = ", ".join(f"`{name}`" for name in classes)
    sections = [
        f"# Model card: catdog {config['arch']}",
        f"Image classifier over {len(classes)} classes ({names}), fine-tuned from ImageNet weights.",
        _card_use(config),
        _card_data(params, summary, paths),
        _card_classes(classes, summary, paths),
        _card_training(params),
        _card_test(test, parity, summary),
        _card_lineage(paths),
        _card_limits(classes),
    ]
    return "\n\n".join(sections) + "\n"


def _card_use(config: dict) -> str:
    return f"""## Use
- Input: one RGB photo. Decoding as in prepare: EXIF rotation applied, converted to RGB,
  squashed to {config["cache_size"]}x{config["cache_size"]} (bilinear),
  then {config["image_size"]}x{config["image_size"]};
  float32 NCHW in [0, 1]. Normalisation is inside the model.
- Output: logits for `{config["classes"]}` (in this order; also in `{ONNX_FILE}`'s metadata `{CLASSES_METADATA}`);
  softmax gives the confidence.
- Files: `{ONNX_FILE}` (ONNX, dynamic batch; `catdog predict` uses it), `{PT2_FILE}` (torch.export),
  `{LABELS_FILE}`, `{PREPROCESS_FILE}`.
- Intended use: sorting photos into the classes above. Not for any decision about people,
  animal welfare or safety."""


def _card_data(params: Params, summary: dict, paths: Paths) -> str:
    splits = ", ".join(f"{name} {sum(counts.values())}" for name, counts in summary["splits"].items())
    return f"""## Data
- Source: `{params.data.source}` ({summary["images"]} usable images; {splits}).
- Rejected files: {summary["rejected_total"]};
  duplicate groups kept within one split: {summary["duplicate_groups_merged"]}.
- Data hash (md5 of `data/prepared/content.json`: size and md5 of the image cache and manifest):
  `{integrity.data_hash(paths)}`."""


def _card_classes(classes: list[str], summary: dict, paths: Paths) -> str:
    return f"""## Classes (images per split; test precision, recall and F1 of each class)
| class | train | val | test | precision | recall | F1 |
|---|---|---|---|---|---|---|
{class_rows(classes, summary["splits"], json.loads(paths.evaluate_details.read_text()))}"""


def _card_training(params: Params) -> str:
    train_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in params.flat("train").items())
    return f"""## Training params
| param | value |
|---|---|
{train_rows}"""


def _card_test(test: dict, parity: dict, summary: dict) -> str:
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in test.items())
    return f"""## Test metrics ({sum(summary["splits"]["test"].values())} held-out images)
| metric | value |
|---|---|
{metric_rows}

Export parity over {parity["parity_images"]} test images: ONNX max |logit diff| {parity["onnx_max_abs_diff"]:.2e},
torch.export max |logit diff| {parity["pt2_max_abs_diff"]:.2e}; accuracy identical to the eager model."""


def _card_lineage(paths: Paths) -> str:
    return f"""## Lineage
- Checkpoint md5: `{integrity.file_md5(paths.checkpoint)}`, as in the `dvc.lock` of the commit that produced
  this model (its code and params). Its MLflow runs carry the tag `{tracking.CHECKPOINT_TAG}` with this value
  (UI search: `tags."{tracking.CHECKPOINT_TAG}" = '...'`)."""


def _card_limits(classes: list[str]) -> str:
    return f"""## Known limits
- Closed set: every input gets one of the {len(classes)} classes, including photos of none of them.
- Labels of the source data carry their own noise (Kaggle's Dogs vs. Cats has mislabelled files and
  some that show no animal); test metrics carry that noise.
- Trained on the photos of the source data (Kaggle's: at most ~500 px, mostly one animal, centred);
  drawings, several animals or unusual viewpoints are less reliable. Confidence is calibrated only
  as far as the reliability diagram of the evaluate stage shows."""


def class_rows(classes: list[str], splits: dict[str, dict[str, int]], details: dict) -> str:
    """One table row per class: its images per split and its test figures from evaluate's details.json
    (``per_class[<class>][precision|recall|f1]`` for more than two classes, flat ``precision_<class>``...
    for two; a figure it lacks shows as "-")."""

    def figure(name: str, kind: str) -> str:
        value = details.get("per_class", {}).get(name, {}).get(kind, details.get(f"{kind}_{name}"))
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    return "\n".join(
        f"| `{name}` | "
        + " | ".join(str(splits.get(split, {}).get(name, 0)) for split in ("train", "val", "test"))
        + " | "
        + " | ".join(figure(name, kind) for kind in ("precision", "recall", "f1"))
        + " |"
        for name in classes
    )
