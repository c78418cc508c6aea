"""The model card (README.md) written next to every converted model."""

from __future__ import annotations

from pathlib import Path


def write_model_card(folder: Path, config: dict, summary: dict, base_model: str) -> None:
    qc = config["quantization_config"]
    bits, block, dtype = qc["bits"], qc["block_size"], qc["dtype"]
    tags = ["kbit", f"{bits}-bit", dtype, f"block-{block}", "quantized"]
    license_ = config.get("license")
    front = ["---", f"base_model: {base_model}", "base_model_relation: quantized",
             "library_name: kbitrt", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in tags]
    if license_:
        front.append(f"license: {license_}")
    front.append("---")
    settings = "\n".join(f"| {k} | {v} |" for k, v in sorted(qc.items())
                         if k not in ("modules_not_quantized", "transposed_modules"))
    body = f"""
# {folder.name if not folder.name.startswith('.') else 'kbit model'}

`{base_model}` quantized by [kbitrt](https://pypi.org/project/kbitrt/) to **{bits}-bit {dtype}**,
blockwise absmax with blocks of {block} ("The case for 4-bit precision", Dettmers & Zettlemoyer 2023).

- Quantized linears: {summary.get('linears_quantized')} ({summary.get('params_quantized'):,} parameters)
- Exact bits per quantized parameter (codes + scales + codebooks + outliers, from the bytes on disk):
  **{summary.get('bits_per_param_quantized'):.4f}**
- Bits per parameter over the whole model: {summary.get('bits_per_param_model'):.4f}
- Size: {summary.get('bytes_after', 0) / 1e9:.3f} GB (from {summary.get('bytes_before', 0) / 1e9:.3f} GB)
- Mean relative weight error: {summary.get('mean_rel_weight_error')}

## Run

```bash
pip install kbitrt
kbit run <this folder or repo> -p "The capital of France is"
kbit dequantize <this folder or repo> -o model-fp16   # a plain transformers model
```

## Quantization settings

| setting | value |
|---|---|
{settings}
"""
    (folder / "README.md").write_text("\n".join(front) + "\n" + body)
