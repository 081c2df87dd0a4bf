"""Which given labels are likely wrong: out-of-fold probabilities, then cleanlab.

``audit`` cross-validates a standardised L2 logistic head on the features (``StratifiedKFold``,
seeded), so each image's probabilities come from a head that never saw it, and ranks the images
cleanlab's ``find_label_issues`` flags by self-confidence (the out-of-fold probability of the given
label: lowest first). Its ``Datalab`` finds near-duplicate sets and outliers in the same features.
A class with fewer images than folds lowers the folds (to 2 at least); a class of one image cannot
be cross-validated and is left out. Both are said in ``notes``, naming the class.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from scipy.sparse.csgraph import connected_components
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize

from catdog.core.errors import CatdogError

MIN_FOLDS = 2
NEIGHBOURS = 10  # Datalab's k
NEAR_DUPLICATE = 0.13  # Datalab: closer than this x the median distance to the nearest neighbour
OUTLIER = 0.37037  # Datalab: mean k-NN distance above Q3 + (1 / OUTLIER - 1) x IQR


@dataclass(frozen=True)
class Findings:
    issues: np.ndarray  # row numbers flagged, most likely wrong first
    scores: np.ndarray  # their label quality (out-of-fold probability of the given label), ascending
    suggested: np.ndarray  # the class index the head prefers for each flagged row
    near_duplicate_sets: list[np.ndarray]  # row numbers of each group of near-identical images
    outliers: np.ndarray  # row numbers of atypical images
    audited: int  # rows audited (all but those of classes left out)
    folds: int
    notes: list[str]


def audit(
    features: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    folds: int,
    c: float,
    filter_by: str,
    seed: int,
) -> Findings:
    """Findings over the rows of ``features`` [N, D] with given ``labels`` (indices into ``classes``)."""
    kept, folds, notes = usable_rows(labels, classes, folds)
    present = np.unique(labels[kept])  # cleanlab wants the labels 0..K-1 of the audited classes
    given = np.searchsorted(present, labels[kept])
    probabilities = out_of_fold_probabilities(features[kept], given, folds, c, seed)
    # n_jobs=1: cleanlab's worker pool would fork the stage's signal handlers (and it is quick anyway)
    flagged = find_label_issues(
        given, probabilities, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    scores = get_label_quality_scores(given, probabilities, method="self_confidence")[flagged]
    rows = np.flatnonzero(kept)
    duplicate_sets, outliers = neighbourhood_issues(features[kept])
    return Findings(
        issues=rows[flagged],
        scores=scores,
        suggested=present[probabilities[flagged].argmax(axis=1)],
        near_duplicate_sets=[rows[group] for group in duplicate_sets],
        outliers=rows[outliers],
        audited=len(rows),
        folds=folds,
        notes=notes,
    )


def usable_rows(labels: np.ndarray, classes: list[str], folds: int) -> tuple[np.ndarray, int, list[str]]:
    """(mask of the rows audited, the folds used, notes): classes of one image are left out, and a
    class smaller than ``folds`` lowers the folds to its size."""
    counts = np.bincount(labels, minlength=len(classes))
    notes = [
        f"class {classes[k]!r} has {counts[k]} image: too few for cross-validation, left out of the audit"
        for k in np.flatnonzero((counts > 0) & (counts < MIN_FOLDS))
    ]
    audited = np.flatnonzero(counts >= MIN_FOLDS)
    if len(audited) < 2:
        raise CatdogError(f"the audit needs two classes of {MIN_FOLDS}+ images, got counts {counts.tolist()}")
    smallest = audited[counts[audited].argmin()]
    if counts[smallest] < folds:
        count = int(counts[smallest])
        notes.append(f"class {classes[smallest]!r} has {count} images, fewer than {folds} folds: using {count} folds")
        folds = count
    return np.isin(labels, audited), folds, notes


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, c: float, seed: int) -> np.ndarray:
    """[N, classes]: each row predicted by a standardised L2 logistic head fitted on the other folds."""
    head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a fold that stops at max_iter is still a fine estimate
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        return cross_val_predict(head, features, labels, cv=splits, method="predict_proba")


def neighbourhood_issues(features: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(sets of near-duplicate rows, outlier rows) from the cosine k-NN graph, by Datalab's rules."""
    k = min(NEIGHBOURS, len(features) - 1)
    # cosine distance = squared euclidean distance / 2 between unit vectors: the euclidean search is 2x faster
    graph = NearestNeighbors(n_neighbors=k).fit(normalize(features)).kneighbors_graph(mode="distance")
    distances = graph.data.reshape(len(features), k) ** 2 / 2  # each row's k neighbours, nearest first
    close = graph.copy()
    close.data = (distances < NEAR_DUPLICATE * np.median(distances[:, 0])).ravel()
    close.eliminate_zeros()
    _, component = connected_components(close, directed=False)
    sizes = np.bincount(component)
    sets = [np.flatnonzero(component == group) for group in np.flatnonzero(sizes > 1)]
    spread = distances.mean(axis=1)
    q1, q3 = np.percentile(spread, [25, 75])
    return sets, np.flatnonzero(spread > q3 + (1 / OUTLIER - 1) * (q3 - q1))
