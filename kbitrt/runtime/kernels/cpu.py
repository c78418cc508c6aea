"""The fused k-bit CPU kernels (cpu_kernels.cpp): prebuilt, or built on first use; twins in reference.py.

The package is built with the kernels compiled ahead for each instruction set of its architecture
(kernels/cpu_build.py: AVX-512 with VNNI, AVX-512, AVX2 + FMA + F16C, portable; scripts/setup.sh
and setup.py run kernels/build_prebuilt.py), and the best variant this CPU runs is loaded without
a compiler; KBIT_CPU_ISA picks another (`native`: always the build below; or a variant's name).
Where no prebuilt set matches (the sources changed in a checkout, another torch, none built), the
C++ source that ships with the package is compiled once per machine by torch's extension
builder (a C++ compiler and ninja; `-march=native`, so its AVX-512 or AVX2 paths are used where the
CPU has them, portable loops elsewhere) into the kbitrt cache, keyed by the source, torch's
version and the CPU's flags. One process builds at a time: the build holds an OS file lock
(flock on `<name>.flock` beside the build folder, released by the kernel however its holder dies),
so a build killed at any stage never wedges later commands: torch's own `lock` file it leaves is
removed by the next builder, a wait longer than KBIT_BUILD_TIMEOUT seconds (default 900) gives up
with one line, and a built library that does not load is rebuilt once. Where it cannot be built, `available()` is False, the reason is
printed once, and the CPU falls back to 16-bit dense copies (kbitrt.runtime.linear): a slower
path, never a failure. Which models hold packed codes by default: loader.cpu_weights_for.

    kbit_linear(x, qweight, absmax, codebook, bias, bits, block_size, K)  y = x W^T, W packed
    kbit_dequantize(qweight, absmax, codebook, bits, block_size, K)       W in fp32
    half_linear(x, weight16, bias)                                   y = x W^T, W fp16 or bf16
    kbit_linear_int8 (the op; cpu_int8.h)   kbit_linear's decode path under int8 activations
                                            (set_activations, the default), twin int8_reference.py

x and y are fp32; y[m] does not depend on how many rows x has up to FUSED_MAX_ROWS (one fixed
summation order), so a decoding step and a verifying step over several tokens agree exactly.
Above it kbit_linear runs a GEMM over W decoded a few rows at a time into cache (cpu_gemm.h:
prefill, perplexity); the other ops still dequantize a layer into a temporary for torch's matmul.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from kbitrt.errors import RunError
from kbitrt.runtime.kernels.cpu_build import (cpu_flags, prebuilt_library, requested_isa,
                                              variants)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# every header SOURCE includes (a new one is in the build's name and the prebuilt manifest's key)
HEADERS = tuple(sorted(Path(__file__).parent.glob("cpu_*.h")))
HALF_DTYPES = (torch.float16, torch.bfloat16)  # what half_linear reads
FUSED_MAX_ROWS = 32  # rows of x the fused kernel takes; above, the prefill GEMM (cpu_gemm.h)
_HEAD_CHUNK = 4096  # output rows per fp32 temporary of a 16-bit head above FUSED_MAX_ROWS
_state: dict = {}


def _cache_dir() -> Path:
    root = Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache" / "kbitrt"))
    return root / "cpu-kernels"


def build_name(variant: str = "native") -> str:
    """The extension's name: changes with the source, torch's version, the CPU and the variant."""
    key = b"".join(p.read_bytes() for p in (SOURCE, *HEADERS))
    flags = " ".join([platform.machine(), *sorted(cpu_flags())])
    key += torch.__version__.encode() + flags.encode() + variant.encode()
    return "kbitrt_cpu_" + hashlib.sha256(key).hexdigest()[:12]


def available() -> bool:
    """Whether the fused CPU kernels are loaded: the prebuilt library for this CPU, else built on
    the first call. RunError for a KBIT_CPU_ISA this CPU cannot run."""
    if "ok" not in _state:
        _state["ok"], _state["reason"] = _load_runtime()
        if not _state["ok"]:
            print(f"kbit: fused CPU kernels unavailable ({_state['reason']}); "
                  "using 16-bit dense copies", file=sys.stderr)
    return _state["ok"]


def loaded_variant() -> str | None:
    """Which build runs: "prebuilt <variant>", "built <variant>" or None (unavailable)."""
    return _state.get("variant") if available() else None


def _load_runtime() -> tuple[bool, str]:
    """The runtime's kernels (torch.ops.kbitrt_cpu): the prebuilt variant KBIT_CPU_ISA asks for
    (default: the best this CPU runs), else compiled here."""
    if os.environ.get("KBIT_CPU_KERNELS", "1") == "0":
        return False, "KBIT_CPU_KERNELS=0"
    isa = requested_isa()
    why = "KBIT_CPU_ISA=native"
    if isa != "native" and sys.platform == "linux":
        lib, name, why = prebuilt_library((SOURCE, *HEADERS), isa, torch.__version__)
        if lib is not None:
            try:
                torch.ops.load_library(str(lib))
                _state["variant"] = f"prebuilt {name}"
                _runtime_ops_loaded()
                return True, ""
            except (OSError, RuntimeError) as e:
                why = f"the prebuilt {name} kernels do not load: {_first_line(e)}"
    variant = isa if isa in variants() else "native"
    ok, reason = _load(variant, "kbitrt_cpu", why)
    if ok:
        _state["variant"] = f"built {variant}"
        return True, ""
    return False, reason if isa == "native" else f"{why}; and building them: {reason}"


def unavailable_reason() -> str | None:
    return None if available() else _state["reason"]


def vectorized() -> bool:
    """Whether the kernels run vector paths here (AVX-512 or AVX2 with FMA and F16C). Only then is
    the packed mode the CPU default: the portable loops are correct everywhere but not faster than
    fp16 copies."""
    return available() and torch.ops.kbitrt_cpu.simd_width() > 0


def describe() -> str:
    """What runs the packed CPU path here: "avx512", "avx2", "portable" or "unavailable"."""
    if not available():
        return "unavailable"
    return {512: "avx512", 256: "avx2"}.get(torch.ops.kbitrt_cpu.simd_width(), "portable")


def _cflags(variant: str) -> list[str]:
    """The build's -march flags: native (the default, every instruction this CPU has) or one of
    kernels/cpu_build.py's variants (what other CPUs run, which tests build beside the native one)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return [] if variant == "native" else list(variants()[variant].cflags)
    return ["-march=native"] if variant == "native" else list(variants()[variant].cflags)


def build_timeout() -> float:
    """Seconds a build waits for another process's build (KBIT_BUILD_TIMEOUT, default 900)."""
    try:
        return max(0.0, float(os.environ.get("KBIT_BUILD_TIMEOUT", "900")))
    except ValueError:
        return 900.0


@contextmanager
def build_lock(build_dir: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock on building into `build_dir`; TimeoutError after `timeout` s.

    Holding it, torch's baton file (`build_dir/lock`, which torch waits on for ever while it
    exists) can only be left by a builder that died: it is removed."""
    lock = build_dir.parent / f"{build_dir.name}.flock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise TimeoutError(f"another process held the build lock {lock} for over "
                                       f"{timeout:.0f} s (KBIT_BUILD_TIMEOUT)") from None
                if not told and waited > 2:
                    print(f"kbit: waiting for another process building the CPU kernels ({lock})",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.1)
        (build_dir / "lock").unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def _load(variant: str = "native", namespace: str | None = None, why: str = "") -> tuple[bool, str]:
    """Build (once) and load the kernels for `variant` as torch.ops.<namespace> (default:
    kbitrt_cpu for native, kbitrt_cpu_<variant> beside it otherwise). `why`: why it is built."""
    if os.environ.get("KBIT_CPU_KERNELS", "1") == "0":
        return False, "KBIT_CPU_KERNELS=0"
    if sys.platform != "linux":
        return False, f"built only on Linux, not {sys.platform}"
    default_ns = "kbitrt_cpu" if variant == "native" else f"kbitrt_cpu_{variant}"
    namespace = namespace or default_ns
    name = build_name(variant if namespace == default_ns else f"{variant}/{namespace}")
    build_dir = _cache_dir() / name
    flags = ["-O3", *_cflags(variant), "-fopenmp", f"-DKBIT_NS={namespace}"]
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with build_lock(build_dir, build_timeout()):
            _build_and_load(name, build_dir, flags,
                            notice=why if namespace == "kbitrt_cpu" else "")
    except (OSError, RuntimeError, ImportError, ValueError) as e:  # no compiler/ninja, build error
        return False, _first_line(e)
    if namespace == "kbitrt_cpu":
        _runtime_ops_loaded()
    return True, ""


def _runtime_ops_loaded() -> None:
    """What every library loaded as torch.ops.kbitrt_cpu (prebuilt or built here) gets: the fakes
    torch.compile traces and the activations mode."""
    _register_fakes()
    torch.ops.kbitrt_cpu.set_int8_activations(_MODE_CODES[activations()])


def _build_and_load(name: str, build_dir: Path, flags: list[str], notice: str) -> None:
    """Build (when out of date) and load the library; one that is built but does not load (a
    corrupt or truncated .so) is removed with its build folder and rebuilt once. `notice`: why
    it is built, told (with where) before a build of the runtime's kernels."""
    from torch.utils import cpp_extension

    so = build_dir / f"{name}.so"
    for attempt in (0, 1):
        if notice and not so.exists():
            print(f"kbit: building the fused CPU kernels for this machine (once, ~20 s) in "
                  f"{build_dir} ({notice})", file=sys.stderr, flush=True)
        try:
            cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(build_dir),
                               extra_cflags=flags, extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
            return
        except (OSError, RuntimeError, ImportError, ValueError) as e:
            if attempt or not so.exists():
                raise
            print(f"kbit: the built CPU kernels in {build_dir} do not load ({_first_line(e)}); "
                  "rebuilding them once", file=sys.stderr, flush=True)
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True, exist_ok=True)
            # torch builds a name once per process: forget that it was "built" here
            getattr(cpp_extension.JIT_EXTENSION_VERSIONER, "entries", {}).pop(name, None)


def load_variant(variant: str):
    """Another build's ops (torch.ops.kbitrt_cpu_<variant>: "avx2" or "portable"), for tests of
    the paths other CPUs run."""
    ok, reason = _load(variant)
    if not ok:
        raise RuntimeError(f"the {variant} CPU kernels did not build: {reason}")
    return getattr(torch.ops, f"kbitrt_cpu_{variant}")


def _register_fakes() -> None:
    """Shapes for torch.compile (`kbit run --compile` traces decode steps through these ops)."""
    @torch.library.register_fake("kbitrt_cpu::kbit_linear")
    def _(x, qweight, absmax, codebook, bias, bits, block_size, in_features):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("kbitrt_cpu::kbit_dequantize")
    def _(qweight, absmax, codebook, bits, block_size, in_features):
        return absmax.new_empty((qweight.shape[0], in_features), dtype=torch.float32)

    @torch.library.register_fake("kbitrt_cpu::kbit_linear_planes")
    def _(x, planes, absmax, codebook, bias, k_planes, block_size, in_features):
        return x.new_empty((x.shape[0], planes.shape[1]))

    @torch.library.register_fake("kbitrt_cpu::kbit_linear_int8")
    def _(x, qweight, absmax, codebook, bias, bits, block_size, in_features):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("kbitrt_cpu::half_linear")
    def _(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


def kbit_linear(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                codebook: torch.Tensor, bias: torch.Tensor | None, bits: int, block_size: int,
                in_features: int) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32 from the packed weight (available() must be True); above
    FUSED_MAX_ROWS rows the op runs its prefill GEMM (cpu_gemm.h)."""
    x = x.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    return torch.ops.kbitrt_cpu.kbit_linear(x, qweight, absmax, codebook, b, bits, block_size,
                                            in_features)


# what the fused decode path multiplies packed weights with (cpu_int8.h): "int8" quantizes x per
# 32 values and sums integer products (VNNI / AVX2), "fp32" looks up fp32 weights and uses FMA,
# "auto" int8 on AVX-512 VNNI and AVX2, and on the portable loops except for 4-bit weights (there
# the exact fp32 path is as fast). Prefill (more than
# FUSED_MAX_ROWS rows) follows the same choice (cpu_gemm_int8.h). The default:
# KBIT_CPU_ACTIVATIONS, else DEFAULT_ACTIVATIONS (docs/cpu.md gives the fidelity)
ACTIVATIONS = ("auto", "int8", "fp32")
DEFAULT_ACTIVATIONS = "auto"
_MODE_CODES = {"fp32": 0, "int8": 1, "auto": 2}  # cpu_int8.h set_int8_activations


def set_activations(mode: str) -> None:
    """Route kbit_linear (and the C++ layer stack's linears) through `mode`'s kernels."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"cpu activations {mode!r}: use one of {', '.join(ACTIVATIONS)}")
    _state["activations"] = mode
    if _state.get("ok"):  # else applied when the kernels load
        torch.ops.kbitrt_cpu.set_int8_activations(_MODE_CODES[mode])


def reset_activations() -> None:
    """Forget set_activations: back to KBIT_CPU_ACTIVATIONS's mode, else DEFAULT_ACTIVATIONS."""
    _state.pop("activations", None)
    if _state.get("ok"):
        torch.ops.kbitrt_cpu.set_int8_activations(_MODE_CODES[activations()])


@contextmanager
def exact_unless_chosen() -> Iterator[str]:
    """Scoring runs (kbit eval, sweeps) on the exact fp32 path unless set_activations or
    KBIT_CPU_ACTIVATIONS chose a mode: a k-bit model's perplexity then measures its weights'
    quantization alone, comparable across widths and with docs/fidelity.md, not also the 8-bit
    activations of the fast path (`--cpu-activations auto` scores what decoding runs). Yields
    the mode in force."""
    if "activations" in _state or os.environ.get("KBIT_CPU_ACTIVATIONS", "").strip():
        yield activations()
        return
    set_activations("fp32")
    try:
        yield "fp32"
    finally:
        reset_activations()


def activations() -> str:
    """The fused decode path's activations: set_activations', else KBIT_CPU_ACTIVATIONS's, else
    DEFAULT_ACTIVATIONS; RunError for a KBIT_CPU_ACTIVATIONS that is none of ACTIVATIONS."""
    if "activations" in _state:
        return _state["activations"]
    env = os.environ.get("KBIT_CPU_ACTIVATIONS", "").strip().lower() or DEFAULT_ACTIVATIONS
    if env not in ACTIVATIONS:
        raise RunError(f"KBIT_CPU_ACTIVATIONS={env!r} is not one of {', '.join(ACTIVATIONS)}")
    return env


def kbit_dequantize(qweight: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
                    bits: int, block_size: int, in_features: int) -> torch.Tensor:
    return torch.ops.kbitrt_cpu.kbit_dequantize(qweight, absmax, codebook, bits, block_size,
                                                in_features)


def kbit_linear_planes(x: torch.Tensor, planes: torch.Tensor, absmax: torch.Tensor,
                       codebook: torch.Tensor, bias: torch.Tensor | None, k_planes: int,
                       block_size: int, in_features: int) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32 from the first k_planes bit planes (cpu_planes.h)."""
    x = x.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    if x.shape[0] <= FUSED_MAX_ROWS:
        return torch.ops.kbitrt_cpu.kbit_linear_planes(x, planes, absmax, codebook, b, k_planes,
                                                       block_size, in_features)
    w = torch.ops.kbitrt_cpu.kbit_dequantize_planes(planes, absmax, codebook, k_planes,
                                                    block_size, in_features)
    return torch.nn.functional.linear(x, w, b)


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32 for an fp16/bf16 weight (N, K), summed in fp32."""
    x = x.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    if x.shape[0] <= FUSED_MAX_ROWS:
        return torch.ops.kbitrt_cpu.half_linear(x, weight, b)
    # a whole fp32 copy of a large head would be a transient of 32 bits per weight: chunk it
    parts = [torch.nn.functional.linear(x, weight[i:i + _HEAD_CHUNK].float(),
                                        None if b is None else b[i:i + _HEAD_CHUNK])
             for i in range(0, weight.shape[0], _HEAD_CHUNK)]
    return torch.cat(parts, dim=-1)
