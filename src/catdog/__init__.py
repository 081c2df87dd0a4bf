"""catdog: reproducible dogs-vs-cats classification with DVC, MLflow and PyTorch."""

CLASSES = ("cat", "dog")  # index order of the model's outputs
