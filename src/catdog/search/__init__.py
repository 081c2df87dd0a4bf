"""The search for the best params: ``catdog tune`` runs an Optuna study over a YAML search space
(``space``: the entries, their ranges and conditions, checked against params.yaml before any
trial), each trial one ``dvc exp run --temp`` outside the workspace whose MLflow run is a child of
the study's parent run (``trials``), the study itself in Optuna's RDB storage, resumable and
shared by several processes, and its end-of-study table (``study``, ``report``). It sits above
``catdog.pipeline`` and below the CLI: it runs the pipeline only through DVC, reads params with
``catdog.core`` and reports from the experiments' commits, and leaves every MLflow call to
``catdog.tracking``.
"""
