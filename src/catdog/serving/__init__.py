"""Predictions for users: ``catdog predict``'s batch prediction through ONNX Runtime with the same
decoding as prepare (``predict``) and the registered MLflow model built from code (``pyfunc``,
the one module here that imports mlflow; it is the model's own file), which precision of the
exported model runs (``precision``: fp32 or a shipped int8/bf16 variant), and that model on Spark
(``spark``: ``catdog spark-predict``; imports pyspark, the ``catdog[spark]`` extra). It may import
``catdog.core``, ``catdog.data`` (image decoding), ``catdog.models`` (the ONNX Runtime session) and
``catdog.tracking`` (to download a registered model), never the stages.
"""
