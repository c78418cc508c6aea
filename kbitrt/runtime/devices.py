"""Devices: which code path a tensor's device takes, and the CUDA twin.

kbitrt has two execution paths: the GPU path (Triton kernels through the `kbitrt::kbit_linear`
op, decode tables and their caches, split-K, fp16/bf16 activations, a packed static KV cache,
CUDA graphs) and the CPU path (the fused C++ kernels, dense 16-bit copies, the C++ layer stack,
fp32 activations). `gpu_path(device)` is the one place that decides between them.

The CUDA twin: with `KBIT_CUDA_TWIN=1` in the environment (or inside `cuda_twin()`), CPU tensors
take the GPU path, with the Triton kernels run by Triton's interpreter (`TRITON_INTERPRET=1`,
which must be set before Triton is first imported). So the whole CUDA path, `generate` calls
included, runs in CI without a GPU. What only a real GPU can run (CUDA graph capture, streams,
device memory statistics) is guarded by `is_cuda(device)` and listed in docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from typing import Iterator

import torch

from kbitrt.errors import RunError

TWIN_ENV = "KBIT_CUDA_TWIN"
_twin_depth = 0  # cuda_twin() contexts entered and not left


def twin_enabled() -> bool:
    """Whether CPU tensors take the GPU path (KBIT_CUDA_TWIN=1 or inside `cuda_twin()`)."""
    if _twin_depth > 0:
        return True
    if os.environ.get(TWIN_ENV, "") in ("", "0"):
        return False
    check_interpreted()
    return True


def check_interpreted() -> None:
    """The twin runs Triton's interpreter: refuse, in one line, a Triton that would compile."""
    from kbitrt.runtime.kernels.triton_kbit import interpreted

    if not interpreted():
        raise RunError(f"the CUDA twin ({TWIN_ENV}=1) runs Triton's interpreter: set "
                       "TRITON_INTERPRET=1 too, before anything imports triton")


@contextlib.contextmanager
def cuda_twin() -> Iterator[None]:
    """Send CPU tensors through the GPU path while inside (the Triton kernels interpreted)."""
    global _twin_depth
    check_interpreted()
    _twin_depth += 1
    try:
        yield
    finally:
        _twin_depth -= 1


def as_device(device: torch.device | str | torch.Tensor) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    return device if isinstance(device, torch.device) else torch.device(device)


def is_cuda(device: torch.device | str | torch.Tensor) -> bool:
    """A real CUDA device (graphs, streams, memory statistics): never true under the twin."""
    return as_device(device).type == "cuda"


def gpu_path(device: torch.device | str | torch.Tensor) -> bool:
    """Whether work on `device` takes the GPU path: CUDA, or the CPU under the CUDA twin."""
    d = as_device(device)
    return d.type == "cuda" or (d.type == "cpu" and twin_enabled())


def cpu_path(device: torch.device | str | torch.Tensor) -> bool:
    """Whether work on `device` takes the CPU path (C++ kernels, dense copies, layer stack)."""
    return as_device(device).type == "cpu" and not twin_enabled()


def resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():  # pragma: no cover - needs a GPU
            raise RunError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise RunError(f"--device {name}: only cpu and cuda are supported")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): call before reading a clock."""
    if is_cuda(device):
        torch.cuda.synchronize(device)  # pragma: no cover - needs a GPU


def default_dtype(device: torch.device, config: dict) -> torch.dtype:
    """fp32 on the CPU path (exact reference); on the GPU path the checkpoint's bf16, else fp16."""
    if not gpu_path(device):
        return torch.float32
    return torch.bfloat16 if config.get("torch_dtype", config.get("dtype")) == "bfloat16" \
        else torch.float16


def reset_peak_memory(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)  # pragma: no cover - needs a GPU


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA's allocator statistics, else the process's peak RSS."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device)  # pragma: no cover - needs a GPU
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def device_name(device: torch.device) -> str:
    if is_cuda(device):
        return f"cuda ({torch.cuda.get_device_name(device)})"  # pragma: no cover - needs a GPU
    twin = ", CUDA twin" if twin_enabled() else ""
    return (f"cpu ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads{twin})")
