"""The MLflow pyfunc flavour of a registered classifier: float32 NCHW images in [0, 1] -> logits.

It runs the TVM llvm library when the version carries one built for this CPU, and the exported
eager program (`model.pt2`) otherwise; `backend` says which. No training code is needed to load it.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from PIL import Image

EAGER, TVM = "torch-eager", "tvm-llvm"
TVM_KEY = "tvm_llvm_b"  # artifacts tvm_llvm_b1, tvm_llvm_b8, ...: one library per batch size


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
        if wanted != "eager" and self._tvm_fits(context):
            from ml.runtime import CompiledClassifier

            libraries = {
                int(key.removeprefix(TVM_KEY)): path for key, path in context.artifacts.items() if key.startswith(TVM_KEY)
            }
            self.backend, self._run = TVM, CompiledClassifier(libraries)
        elif wanted == "tvm":
            raise RuntimeError("backend 'tvm' requested, but this version has no TVM library built for this CPU")
        else:
            import torch

            module = torch.export.load(context.artifacts["exported"]).module()
            self.backend = EAGER

            def run(batch: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return module(torch.as_tensor(batch)).numpy()

            self._run = run

    @staticmethod
    def _tvm_fits(context) -> bool:
        from ml.runtime import host_target

        built_for = context.model_config.get("tvm_llvm_target")
        return any(key.startswith(TVM_KEY) for key in context.artifacts) and built_for == host_target()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        return self._run(np.asarray(model_input, dtype=np.float32))
