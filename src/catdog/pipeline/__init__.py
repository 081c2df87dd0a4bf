"""The four DVC stages, each a ``run(params, paths) -> metrics`` that ``stages/<name>.py`` calls
through the shared entry (``stage``): ``prepare`` (decode, validate, de-duplicate, split),
``train`` (fit and keep the best epoch; its set-up in ``train_setup`` and its resumable state in
``train_state``), ``evaluate`` (test metrics and figures) and ``export`` (ONNX, torch.export, parity,
registration; its reduced-precision variants in ``variants``, its card in ``model_card``). The top
layer below the ``catdog`` CLI: it may import every other subpackage, and nothing imports it except
the CLI entry points.
"""
