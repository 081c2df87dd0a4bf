"""What a study says at its end: the summary (``--json``'s last line), the table of its best trials
with the ``dvc exp apply`` command of the best, and the figures and CSV its parent run keeps."""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from catdog.core.plots import plt  # the project's non-interactive matplotlib

TABLE_ROWS = 5


def summarise(study: optuna.Study) -> dict:
    """``{"study": .., "best": {"experiment", "value", "params"} | None, "trials": {"complete", "failed",
    "pruned"}}``: the last line of ``catdog tune --json``."""
    states = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL, "pruned": TrialState.PRUNED}
    counts = {label: len(study.get_trials(deepcopy=False, states=(state,))) for label, state in states.items()}
    best = _ranked(study)[:1]
    return {
        "study": study.study_name,
        "best": (
            {"experiment": best[0].user_attrs.get("experiment"), "value": best[0].value, "params": _params(best[0])}
            if best
            else None
        ),
        "trials": counts,
    }


def best_table(study: optuna.Study, metric: str) -> str:
    """The best trials, best first: the params that differ between them, the objective, the test
    accuracy (for information: never used to choose) and the wall time; then how to apply the best."""
    ranked = _ranked(study)[:TABLE_ROWS]
    if not ranked:
        return f"tune: study {study.study_name!r} has no complete trial yet"
    keys = sorted({key for trial in ranked for key in _params(trial)})
    if len(ranked) > 1:  # a value all of them share says nothing about which is best
        keys = [k for k in keys if len({repr(_params(t).get(k)) for t in ranked}) > 1] or keys
    header = ["experiment", metric, "test_accuracy", "wall_s", *keys]
    rows = [
        [
            str(trial.user_attrs.get("experiment")),
            _shown(trial.value),
            _shown(trial.user_attrs.get("test", {}).get("accuracy")),
            f"{trial.duration.total_seconds():.0f}" if trial.duration else "",
            *(_shown(_params(trial).get(key, "")) for key in keys),
        ]
        for trial in ranked
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    best = ranked[0].user_attrs.get("experiment")
    return "\n".join([*lines, f"best: {best}; make it the workspace with: dvc exp apply {best}"])


def study_figures(study: optuna.Study) -> dict:
    """The optimisation history (from one complete trial) and the params' importances (from two), by file name."""
    from optuna.visualization import matplotlib as optuna_plots

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = [
        ("optimization_history.png", optuna_plots.plot_optimization_history),
        ("param_importances.png", optuna_plots.plot_param_importances),
    ][: min(complete, 2)]
    figures = {}
    with warnings.catch_warnings():  # experimental API, an empty legend: nothing the user can act on
        warnings.simplefilter("ignore")
        for name, plot in plots:
            try:
                figures[name] = plot(study).figure
            except (ValueError, RuntimeError) as exc:  # e.g. every complete trial has the same params
                print(f"tune: no {name}: {exc}")
    for figure in figures.values():
        figure.set_size_inches(8, 5)
        figure.tight_layout()
    return figures


def close_figures(figures: dict) -> None:
    for figure in figures.values():
        plt.close(figure)


def _ranked(study: optuna.Study) -> list[FrozenTrial]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)


def _params(trial: FrozenTrial) -> dict:
    """The trial's params.yaml values (a set choice expanded into its keys)."""
    return trial.user_attrs.get("params", trial.params)


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
