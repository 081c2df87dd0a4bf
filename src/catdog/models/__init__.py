"""The network and how it runs: the model factory and checkpoints (``factory``), the architectures
and their pretrained weights (``architectures``), device and precision decided once (``device``),
optimizer and schedule (``optim``), the loops (``engine``), the frozen prefix on ONNX Runtime or
CUDA (``frozen``), ONNX export and the tuned session (``onnx_runtime``), the int8/bf16 variants and
their runtimes, CPU capabilities included (``variants``), the logistic head
(``linear_probe``) and DDP under torchrun (``distributed``). It may import ``catdog.core`` and
third-party packages (torch, onnxruntime, openvino, scikit-learn), not the data layer, tracking, serving or the
stages: tensors and loaders come in as arguments.
"""
