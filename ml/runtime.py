"""Running a TVM-built classifier library on the CPU: what the compile step checks and what the
registry's model flavour serves. Needs the TVM runtime only, none of the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def host_target() -> dict:
    """LLVM target for this machine's CPU, as TVM's own LLVM detects it (a library built for
    another CPU can die with an illegal instruction, so it is never named by hand)."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}


class CompiledClassifier:
    """A TVM-built library on the CPU: float32 NCHW images in [0, 1] -> logits."""

    def __init__(self, library: Path):
        import tvm
        from tvm import relax

        self._tvm = tvm
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        outputs = self._vm["main"](self._tvm.runtime.tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        return outputs[0].numpy()  # the exported program returns a one-element tuple
