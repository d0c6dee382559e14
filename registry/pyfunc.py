"""The MLflow pyfunc flavour of a registered classifier: float32 NCHW images in [0, 1] -> logits.

It runs the TVM CUDA library built for this machine's GPU when the version carries one, else the
TVM llvm library when it carries one built for this CPU, else the exported eager program
(`model.pt2`); `backend` says which. No training code is needed to load it.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from PIL import Image

from ml.runtime import (
    EXPORTED_KEY,
    CompiledClassifier,
    CudaClassifier,
    cuda_key,
    eager_predict_fn,
    gpu_arch,
    host_target,
    llvm_libraries,
)

EAGER, TVM, TVM_CUDA = "torch-eager", "tvm-llvm", "tvm-cuda"


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The resize every split is evaluated with (`ml.data.eval_transform`), as a CHW array."""
    from ml.data.transforms import eval_transform

    return eval_transform(size)(image.convert("RGB")).numpy()


class SpeciesClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config
        self.classes: list[str] = config["classes"]
        self.image_size: int = config["image_size"]
        wanted = config.get("backend", "auto")  # auto | tvm | eager, overridable at load time
        libraries = llvm_libraries(context.artifacts)
        arch = gpu_arch() if wanted != "eager" else None
        if arch and cuda_key(arch) in context.artifacts:
            self.backend, self._run = TVM_CUDA, CudaClassifier(context.artifacts[cuda_key(arch)])
        elif wanted != "eager" and libraries and config.get("tvm_llvm_target") == host_target():
            self.backend, self._run = TVM, CompiledClassifier(libraries)
        elif wanted == "tvm":
            raise RuntimeError("backend 'tvm' requested, but this version has no TVM library built for this GPU or CPU")
        else:
            import torch

            self.backend = EAGER
            self._run = eager_predict_fn(torch.export.load(context.artifacts[EXPORTED_KEY]).module())

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        return self._run(np.asarray(model_input, dtype=np.float32))
