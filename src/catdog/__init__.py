"""catdog: reproducible image classification (dogs vs cats by default) with DVC, MLflow and PyTorch."""
