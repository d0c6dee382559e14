"""The ways to run the classifier on this machine's CPU, each as `prepare(model, batch) -> run(x)`."""

from __future__ import annotations

from pathlib import Path

import torch

from ml.runtime import PredictFn as Run
from ml.runtime import eager_predict_fn


def eager(model: torch.nn.Module, batch: int, work_dir: Path) -> Run:
    return eager_predict_fn(model)


def torch_compile(model: torch.nn.Module, batch: int, work_dir: Path) -> Run:
    compiled = torch.compile(model, dynamic=False)
    return eager(compiled, batch, work_dir)


def onnx_runtime(model: torch.nn.Module, batch: int, work_dir: Path, provider: str = "CPUExecutionProvider") -> Run:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise LookupError(f"this onnxruntime has no {provider} (on a GPU, onnxruntime-gpu provides it)")

    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"model_b{batch}.onnx"
    example = torch.rand(batch, 3, model.image_size, model.image_size)
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"], output_names=["logits"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=[provider])
    return lambda x: session.run(None, {"images": x})[0]


def tvm_tuned(model: torch.nn.Module, batch: int, work_dir: Path) -> Run:
    """The retraining DAG's compile step, run as the service runs it, with `batch` among the
    configured batch sizes (INSECT_COMPILE__BATCH_SIZES): a library per size, tuned records
    shared with the DAG's."""
    from config import get_settings
    from ml.compile import build_static
    from ml.runtime import CompiledClassifier

    settings = get_settings()
    work_dir.mkdir(parents=True, exist_ok=True)
    return CompiledClassifier(
        {
            size: build_static(model, size, settings.compile, settings.tuning_dir, work_dir / f"model_llvm_b{size}.so")
            for size in {*settings.compile.batch_sizes, batch}
        }
    )


RUNTIMES = {"eager": eager, "torch.compile": torch_compile, "onnxruntime": onnx_runtime, "tvm": tvm_tuned}
