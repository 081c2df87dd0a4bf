"""The label-issue audit of a labelled image set: from one feature vector per image and its given
label, out-of-fold probabilities of a cross-validated, standardised logistic head (scikit-learn),
then cleanlab's ranked label issues, near-duplicate sets and outliers. It owns the audit's logic
only: it may import catdog.core, scikit-learn, cleanlab and numpy; how the features are computed
(the frozen backbone), the stage's files and MLflow belong to ``catdog.pipeline.audit``.
"""
