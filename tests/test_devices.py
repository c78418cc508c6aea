"""runtime/devices.py: the one place that decides a device's path, its errors, and the CUDA twin's
effect on the path-dependent defaults."""

from __future__ import annotations

import pytest
import torch

from kbitrt.errors import RunError
from kbitrt.runtime.devices import (as_device, cpu_path, cuda_twin, default_dtype, device_name,
                                    gpu_path, is_cuda, peak_memory, reset_peak_memory,
                                    resolve_device, synchronize)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors without a GPU")


def test_resolve_device_names():
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name,says", [("nope", "is not a device"), ("meta", "only cpu and cuda")])
def test_resolve_device_refuses_in_one_line(name, says):
    with pytest.raises(RunError, match=says) as e:
        resolve_device(name)
    assert "\n" not in str(e.value)


@no_gpu
def test_resolve_device_without_a_gpu():
    with pytest.raises(RunError, match="no CUDA GPU is available here; use --device cpu"):
        resolve_device("cuda:0")


def test_paths_and_defaults_follow_the_twin():
    cpu = torch.device("cpu")
    assert cpu_path(cpu) and not gpu_path(cpu) and not is_cuda(cpu)
    assert default_dtype(cpu, {"torch_dtype": "bfloat16"}) == torch.float32
    assert "CUDA twin" not in device_name(cpu)
    with cuda_twin():
        assert gpu_path(torch.zeros(1)) and not cpu_path("cpu") and not is_cuda("cpu")
        assert default_dtype(cpu, {"torch_dtype": "bfloat16"}) == torch.bfloat16
        assert default_dtype(cpu, {"dtype": "float32"}) == torch.float16
        assert "CUDA twin" in device_name(cpu)
    assert as_device(torch.zeros(1)) == cpu and as_device("cpu") == cpu


def test_clock_and_memory_helpers_on_the_cpu():
    cpu = torch.device("cpu")
    synchronize(cpu)  # a no-op
    reset_peak_memory(cpu)
    assert peak_memory(cpu) > 0  # the process's peak RSS
