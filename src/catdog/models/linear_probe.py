"""``train.head: logistic``: the head fitted in closed form instead of by gradient epochs.

On frozen embeddings, scikit-learn's L2-regularised logistic regression on standardised features
(strong regularisation: C ≈ 0.01 on dogs vs cats) beats a gradient-trained head: standardising
puts every feature on one scale so the penalty treats them alike. The scaler and the regression
are folded into the head's ``Linear`` layer (w / sigma, b - w . mu / sigma), so the checkpoint
and the exported ONNX model stay one plain model with normalisation inside. ``train.logistic_c: auto``
(the default) picks C on the val split (``choose_c``): ten classes of digits want ~10x the C of two
classes of photos, so no single C fits any data.

The fits run on one BLAS thread: L-BFGS steps through small matrix-vector products, and waking
OpenBLAS's threads for each costs more than it saves (on 2 cores, the nine fits of ``choose_c`` on the
sample's 492 x 1280 features take 0.05 s on one thread, 0.6-0.8 s on two).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from catdog.models.engine import EpochStats

C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 9))  # train.logistic_c auto: 0.001 ... 10, half-decade steps
C_TOLERANCE = 0.05  # a weaker penalty is chosen only if it lowers the best val log loss by more than 5%


def choose_c(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    class_weight: str | None = None,
    grid: tuple[float, ...] = C_GRID,
) -> tuple[float, dict[float, float]]:
    """(the chosen C, {C: val log loss}): each C of ``grid`` fitted on ``train`` (features, labels) as
    ``fit_logistic_head`` fits it, then the smallest C (the strongest penalty) whose val log loss is
    within ``C_TOLERANCE`` of the lowest: val splits are small, and their losses of neighbouring Cs differ
    by less than their noise. Fitted on train only: val chooses one number among a few, and the val
    figures train reports stay those of a head val never fitted."""
    (x, y), (x_val, y_val) = ((f.double().numpy(), labels.numpy()) for f, labels in (train, val))
    scaler = StandardScaler().fit(x)
    x, x_val = scaler.transform(x), scaler.transform(x_val)
    losses = {}
    for c in sorted(grid):
        regression = _fit(LogisticRegression(C=c, class_weight=class_weight, max_iter=2000), x, y)
        losses[c] = log_loss(y_val, regression.predict_proba(x_val), labels=regression.classes_)
    best = min(losses.values())
    return min(c for c, loss in losses.items() if loss <= best * (1 + C_TOLERANCE)), losses


def fit_logistic_head(
    head: nn.Sequential, features: torch.Tensor, labels: torch.Tensor, c: float, class_weight: str | None = None
) -> EpochStats:
    """Fits standardise + logistic regression on (features, labels), multinomial for more than two
    classes, with scikit-learn's ``class_weight`` (None or 'balanced'), writes it into ``head``'s last
    Linear layer and returns the (unweighted) train loss and accuracy of the fitted head."""
    x, y = features.double().numpy(), labels.numpy()
    scaler = StandardScaler().fit(x)
    regression = _fit(LogisticRegression(C=c, class_weight=class_weight, max_iter=2000), scaler.transform(x), y)
    weight = regression.coef_ / scaler.scale_  # [1, D] for two classes, [K, D] for more
    bias = regression.intercept_ - weight @ scaler.mean_
    if len(regression.classes_) == 2:  # sigmoid(z) == softmax([-z/2, z/2])[1]
        weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    linear = head[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
        logits = head.eval()(features)
    loss = nn.functional.cross_entropy(logits, labels).item()
    return EpochStats(loss, (logits.argmax(1) == labels).float().mean().item())


def _fit(regression: LogisticRegression, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    with threadpool_limits(1, user_api="blas"):  # see the module's docstring
        return regression.fit(x, y)
