"""Inference benchmarks: eager PyTorch, torch.compile, ONNX Runtime and TVM, pruned and unpruned."""
