"""Options that several commands share, declared once: how a model is placed and what it holds."""

from __future__ import annotations

import click

from kbitrt.errors import KbitError


def placement_options(f):
    """--bits (any-precision width), --device-map and --max-memory."""
    for opt in reversed((
        click.option("--bits", default=None, help="Any-precision models: the width K (reads only K "
                     "bit planes), or LO-HI to keep those widths resident."),
        click.option("--device-map", default=None, help="Split the model over devices: auto, "
                     "balanced, sequential or a JSON file {unit or module: device} "
                     "(see docs/scaling.md)."),
        click.option("--max-memory", default=None, help="Per-device budget for --device-map, e.g. "
                     "0=20GiB,cpu=60GiB (accelerate's syntax)."),
    )):
        f = opt(f)
    return f


def _set_cpu_activations(ctx, param, value):
    if value is not None:
        from kbitrt.runtime.kernels import cpu

        cpu.set_activations(value)


def cpu_weight_options(f):
    """--low-memory, --cpu-weights and --kv-cache: what a quantized linear and the KV cache hold
    on the CPU."""
    f = click.option("--kv-cache", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default=None,
                     help="What the KV cache holds (default auto: the activations' dtype, fp32 on "
                     "the CPU; fp16 with --low-memory): 16 bits halve it, at their rounding of "
                     "keys and values.")(f)
    f = click.option("--cpu-weights", type=click.Choice(["auto", "packed", "fp16", "bf16", "fp32"]),
                     default=None, help="CPU: what a quantized linear holds (default auto: the "
                     "packed codes where the fused CPU kernels run vectorized, else fp16 copies; "
                     "under --cpu-activations fp32 only for 3..6-bit models).")(f)
    f = click.option("--cpu-activations", type=click.Choice(["auto", "int8", "fp32"]), default=None,
                     expose_value=False, callback=_set_cpu_activations,
                     help="CPU: activations quantized to int8 per 32 values with integer "
                     "dot products, or the exact fp32 path; auto (default, KBIT_CPU_ACTIVATIONS): "
                     "int8, except 4-bit weights on CPUs without AVX-512 VNNI. kbit eval "
                     "defaults to fp32, to score the weights' quantization alone.")(f)
    return click.option("--low-memory", is_flag=True, help="CPU: keep only the packed k-bit "
                        "weights resident, at any width (= --cpu-weights packed), and the KV "
                        "cache in fp16 (= --kv-cache fp16 under the CPU's fp32 activations).")(f)


def resolve_cpu_weights(low_memory: bool, cpu_weights: str | None, packed: bool = False) -> str:
    """What the CPU linears hold from --low-memory/--cpu-weights (`packed`: the command needs the
    packed weights anyway); contradicting flags are one error."""
    if low_memory and cpu_weights not in (None, "packed"):
        raise KbitError(f"--low-memory and --cpu-weights {cpu_weights} contradict each other: "
                        "give one of them")
    return "packed" if low_memory or packed else (cpu_weights or "auto")


def resolve_kv_cache(low_memory: bool, kv_cache: str | None) -> str:
    """What the KV cache holds from --low-memory/--kv-cache (an explicit --kv-cache wins;
    --low-memory's fp16 applies under fp32 activations, loader.kv_cache_for)."""
    return kv_cache or ("low-memory" if low_memory else "auto")
