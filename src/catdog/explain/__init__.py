"""What a trained model looks at: class activation maps (Grad-CAM and the other methods of the ``grad-cam``
library) over the model's input, the faithfulness check of those maps, and the tutorials' other two views of a
convnet, feature maps per stage and the input patterns that most excite a channel. It sits above
``catdog.core``, ``catdog.data`` and ``catdog.models`` and may import only those (never MLflow); the
evaluate stage, ``catdog predict --explain`` and ``catdog explain`` use it. It works on an eager
``Classifier`` (the checkpoint) or an unflattened ``torch.export`` program (``model.pt2``), the same layer
names reaching into both.
"""
