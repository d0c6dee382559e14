"""The MLflow pyfunc flavour of a registered classifier: float32 NCHW images in [0, 1] -> logits.

It runs the exported eager program (`model.pt2`); no training code is needed to load it.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np


class SpeciesClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        self.classes: list[str] = context.model_config["classes"]
        self.image_size: int = context.model_config["image_size"]
        self._module = torch.export.load(context.artifacts["exported"]).module()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._module(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()
