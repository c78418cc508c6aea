"""kbit folder -> a plain Hugging Face folder (fp16/bf16/fp32) that transformers loads as usual."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kbitrt.convert.converter import MAX_SHARD_BYTES
from kbitrt.convert.experts import fused_targets, write_fused
from kbitrt.format.experts import split_expert_linear
from kbitrt.convert.staging import check_output, staged_folder
from kbitrt.format.reader import KbitModel
from kbitrt.format.safetensors_io import DTYPE_NAMES, PlannedTensor, ShardWriter, plan_shards
from kbitrt.convert.source import companion_files
from kbitrt.errors import KbitFormatError

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dequantize_model(source: str | Path, output: str | Path, dtype: str = "fp16", *,
                     force: bool = False, progress=None) -> dict:
    """Write every quantized linear back as a dense weight (Conv1D layout restored for GPT-2)."""
    from kbitrt.convert.source import resolve_model

    km = KbitModel.open(resolve_model(source))
    if dtype not in TORCH_DTYPES:
        raise KbitFormatError(f"--dtype {dtype!r}: use fp16, bf16 or fp32")
    target = TORCH_DTYPES[dtype]
    out = Path(output).expanduser().resolve()
    check_output(km.path, out, force)
    plan: list[PlannedTensor] = []
    fused = fused_targets(km)  # MoE: per-expert linears back into transformers' fused tensors
    plan += [PlannedTensor(f.name, DTYPE_NAMES[target], f.shape) for f in fused.values()]
    for module, e in km.modules.items():
        if (split := split_expert_linear(module)) and split[0] in fused:
            continue
        shape = (e.in_features, e.out_features) if module in km.transposed else (e.out_features, e.in_features)
        plan.append(PlannedTensor(f"{module}.weight", DTYPE_NAMES[target], shape))
    for name in km.plain_names:
        info = km.info(name)
        floating = info.dtype in ("F16", "BF16", "F32", "F64")
        plan.append(PlannedTensor(name, DTYPE_NAMES[target] if floating else info.dtype, info.shape))
    plan.sort(key=lambda t: t.name)
    shards = plan_shards(plan, MAX_SHARD_BYTES)
    with staged_folder(out) as tmp:
        weight_map = {}
        done, total = 0, len(plan)
        for fname, group in shards:
            w = ShardWriter(tmp / fname, group, {"format": "pt"})
            for t in group:
                module = t.name.rpartition(".")[0]
                if t.name in fused:
                    write_fused(w, km, fused[t.name], target)
                elif module in km.modules and t.name.endswith(".weight"):
                    dense = km.quantized(module).dequantize(target)
                    w.write(t.name, dense.t().contiguous() if module in km.transposed else dense)
                else:
                    x = km.tensor(t.name)
                    w.write(t.name, x.to(target) if x.is_floating_point() else x)
                weight_map[t.name] = fname
                done += 1
                if progress:
                    progress(t.name, done, total)
            w.close()
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map},
                indent=2, sort_keys=True) + "\n")
        config = dict(km.config)
        config.pop("quantization_config")
        config["dtype"] = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
        if km.quant.quantize_head and "lm_head" in "".join(km.modules):
            config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in companion_files(km.path):
            shutil.copyfile(f, tmp / f.name)
    return {"source": str(source), "output": str(out), "dtype": dtype,
            "tensors": len(plan), "bytes": sum(t.nbytes for t in plan)}
