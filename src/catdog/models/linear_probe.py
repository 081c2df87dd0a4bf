"""``train.head: logistic``: the head fitted in closed form instead of by gradient epochs.

On frozen embeddings, scikit-learn's L2-regularised logistic regression on standardised features
(strong regularisation, ``train.logistic_c`` ≈ 0.01) beats a gradient-trained head: standardising
puts every feature on one scale so the penalty treats them alike. The scaler and the regression
are folded into the head's ``Linear`` layer (w / sigma, b - w . mu / sigma), so the checkpoint
and the exported ONNX model stay one plain model with normalisation inside.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from catdog.models.engine import EpochStats


def fit_logistic_head(
    head: nn.Sequential, features: torch.Tensor, labels: torch.Tensor, c: float, class_weight: str | None = None
) -> EpochStats:
    """Fits standardise + logistic regression on (features, labels), multinomial for more than two
    classes, with scikit-learn's ``class_weight`` (None or 'balanced'), writes it into ``head``'s last
    Linear layer and returns the (unweighted) train loss and accuracy of the fitted head."""
    x, y = features.double().numpy(), labels.numpy()
    scaler = StandardScaler().fit(x)
    regression = LogisticRegression(C=c, class_weight=class_weight, max_iter=2000).fit(scaler.transform(x), y)
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
