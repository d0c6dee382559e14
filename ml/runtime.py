"""Running a TVM-built classifier library on the CPU or a GPU: what the compile step checks and
what the registry's model flavour serves. Needs the TVM runtime only, none of the training code."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]  # float32 NCHW in [0, 1] -> logits (N, classes)

# A registered version's artifact keys: the exported eager program and one TVM library per
# llvm batch size and CUDA arch. The compile step writes them, the registry's flavour reads them.
EXPORTED_KEY = "exported"
_LLVM_PREFIX, _CUDA_PREFIX = "tvm_llvm_b", "tvm_cuda_"


def llvm_key(batch: int) -> str:
    return f"{_LLVM_PREFIX}{batch}"


def cuda_key(arch: str) -> str:
    return f"{_CUDA_PREFIX}{arch}"


def gpu_arch() -> str | None:
    """This machine's first GPU as a CUDA arch (`sm_90` on an H100 or H200), None without one."""
    import tvm

    if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
        return None
    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def llvm_libraries(artifacts: dict[str, str]) -> dict[int, str]:
    """Batch size -> library path, of the llvm libraries among a version's artifacts."""
    return {int(key.removeprefix(_LLVM_PREFIX)): path for key, path in artifacts.items() if key.startswith(_LLVM_PREFIX)}


def eager_predict_fn(module) -> PredictFn:
    """A torch module (or torch.export program's module) as a numpy batch -> float32 logits
    function, run where its weights are and in their dtype (a GPU, bf16 inside a training engine)."""
    import torch

    weight = next(module.parameters())
    device, dtype = weight.device, weight.dtype

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.as_tensor(batch).to(device, dtype)).float().cpu().numpy()

    return predict


def host_target() -> dict:
    """LLVM target for this machine's CPU, as TVM's own LLVM detects it (a library built for
    another CPU can die with an illegal instruction, so it is never named by hand)."""
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())}  # a plain str: it goes into YAML and JSON


def claim_tvm_threads() -> int:
    """Threads for TVM's pool: one per physical core, unless TVM_NUM_THREADS says otherwise.
    TVM's default is half the logical CPUs, which assumes hyper-threading: on a VM with one thread
    per core it leaves half the cores idle (1.5x slower at batch 1 here). Sets the variable so the
    pool, started on first use, and MetaSchedule's measuring subprocesses all use that count."""
    import psutil

    os.environ.setdefault("TVM_NUM_THREADS", str(psutil.cpu_count(logical=False) or 1))
    return int(os.environ["TVM_NUM_THREADS"])


class CompiledClassifier:
    """TVM-built libraries on the CPU, one per static batch size: float32 NCHW images in [0, 1]
    -> logits. Any batch runs as chunks of the built sizes, the last one zero-padded."""

    def __init__(self, libraries: dict[int, Path]):
        import tvm
        from tvm import relax

        claim_tvm_threads()
        self._from_dlpack = tvm.runtime.from_dlpack
        # looked up once: a lookup per call costs as much as several of the small model's kernels
        self._mains = {
            size: relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())["main"]
            for size, path in sorted(libraries.items())
        }

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        size = next((s for s in self._mains if s >= len(chunk)), max(self._mains))
        padded = aligned_zeros((size, *chunk.shape[1:]))
        padded[: len(chunk)] = chunk
        outputs = self._mains[size](self._from_dlpack(padded))  # no copy: TVM reads the array itself
        return outputs[0].numpy()[: len(chunk)]  # the exported program returns a one-element tuple

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        step = max(self._mains)
        return np.concatenate([self._run(batch[i : i + step]) for i in range(0, len(batch), step)])


class CudaClassifier:
    """A TVM CUDA library (any batch size) on this machine's first GPU: float32 NCHW images in
    [0, 1] -> logits, numpy in and out, as the CPU libraries are called."""

    def __init__(self, library: Path):
        import tvm
        from tvm import relax

        self._device = tvm.cuda(0)
        self._to_device = tvm.runtime.tensor
        self._main = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self._device)["main"]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        images = self._to_device(np.ascontiguousarray(batch, dtype=np.float32), device=self._device)
        return self._main(images)[0].numpy()


def aligned_zeros(shape: tuple[int, ...], alignment: int = 64) -> np.ndarray:
    """float32 zeros starting on an `alignment`-byte boundary: TVM's kernels assume 64, and take
    only such arrays without a copy (numpy aligns to 16)."""
    count = int(np.prod(shape))
    buffer = np.zeros(count + alignment // 4, np.float32)
    offset = (-buffer.ctypes.data % alignment) // 4
    return buffer[offset : offset + count].reshape(shape)
