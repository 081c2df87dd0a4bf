"""An exported classifier cut where its head begins: ``<stem>.backbone.onnx`` (image in, pooled features
out) and ``<stem>.head.onnx`` (features in, logits out), two ONNX files that together compute the whole.

Export checks each precision variant against fp32 over the whole test split. Most of that work is the
backbone, which a trial that changes only the head (a head search, a new C) leaves as it was: cut at
the head, the backbone's activations are cached by the backbone's own bytes and only the head runs
again. The head is what reads the weights only nodes after the last convolution read (the Linear,
into which a logistic head folds its standardisation); int8 keeps it fp32 under the same names, so
the same cut serves every variant.
"""

from __future__ import annotations

from pathlib import Path

from catdog.models.variants import head_weights


def split_at_head(model_file: Path, folder: Path) -> tuple[Path, Path] | None:
    """(backbone file, head file) written in ``folder``, named after ``model_file``; None when the graph
    has no single tensor where its head begins (no head weights, or a head that reads more than the features)."""
    import onnx
    import onnx.utils

    model = onnx.load(str(model_file))
    head = head_weights(model)
    nodes = list(model.graph.node)
    first = next((i for i, node in enumerate(nodes) if head.keys() & set(node.input)), None)
    if first is None:
        return None
    produced_before = {name for node in nodes[:first] for name in node.output}
    crossing = {name for node in nodes[first:] for name in node.input} & produced_before
    if len(crossing) != 1:
        return None
    (features,) = crossing
    extractor = onnx.utils.Extractor(model)
    parts = (
        (folder / f"{model_file.stem}.backbone.onnx", [model.graph.input[0].name], [features]),
        (folder / f"{model_file.stem}.head.onnx", [features], [output.name for output in model.graph.output]),
    )
    for path, inputs, outputs in parts:
        onnx.save(extractor.extract_model(inputs, outputs), str(path))
    return parts[0][0], parts[1][0]
