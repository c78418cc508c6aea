"""`kbit convert`, `kbit dequantize`, `kbit inspect`."""

from __future__ import annotations

import json
from dataclasses import replace

import click
from rich.console import Console
from rich.table import Table

from kbitrt.errors import KbitError, KbitFormatError
from kbitrt.eval.progress import byte_progress
from kbitrt.format import dtypes
from kbitrt.format.config import (ABSMAX_DTYPES, HEAD_BITS_DEFAULT, HEAD_DTYPE_AT_8, IMPORTANCE,
                                  METHODS, SCALES, OutlierSpec, QuantConfig, parse_bits16)

err = Console(stderr=True)
out = Console()


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(), help="output folder")
@click.option("-b", "--bits", default=4, show_default=True, type=click.IntRange(3, 8),
              help="bits per weight, 3..8")
@click.option("--block", default=64, show_default=True, type=int, help="block size, 32..4096")
@click.option("--dtype", default="nf", show_default=True, type=click.Choice(dtypes.names()),
              help="data type (codebook)")
@click.option("--exponent-bits", type=int, default=None, help="fp only: exponent bits (default ceil(k/2))")
@click.option("--absmax-dtype", default="fp16", show_default=True, type=click.Choice(ABSMAX_DTYPES),
              help="how block scales are stored (dq8: 8-bit double quantization)")
@click.option("--outliers", default=None, callback=lambda ctx, param, v: _outliers(v), help="proxy quantization: 'zscore:4' or 'top:2%' (16-bit columns)")
@click.option("--scales", default="absmax", show_default=True, type=click.Choice(SCALES),
              help="block scales: absmax, or mse (the least-squared-error scale of each block)")
@click.option("--importance", default="none", show_default=True, type=click.Choice(IMPORTANCE),
              help="weight each input column's error in --scales mse / --dtype lloyd: norm = the "
                   "squared gain of the norm the linear reads (zero-shot, native families); random = "
                   "each input's second moment while the model reads seeded random tokens (no data; "
                   "--calib-samples x --calib-seqlen of them); "
                   "hessian = each input's second moment on the calibration data (--calib; with "
                   "--method rtn or gptq)")
@click.option("--method", default="rtn", show_default=True, type=click.Choice(METHODS),
              help="rtn: round to nearest; gptq: GPTQ with calibration data (native decoder families)")
@click.option("--calib", default=None,
              help="gptq / --importance hessian: calibration text file, or a dataset name (wikitext2, c4)")
@click.option("--calib-samples", default=128, show_default=True, type=click.IntRange(min=1), help="gptq / --importance hessian|random: windows")
@click.option("--calib-seqlen", default=2048, show_default=True, type=click.IntRange(min=2), help="gptq / --importance hessian|random: tokens per window")
@click.option("--damp", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="gptq: dampening, a fraction of the mean Hessian diagonal")
@click.option("--act-order", is_flag=True, help="gptq: columns in order of decreasing activation")
@click.option("--quantize-head", is_flag=True, help="also quantize the output head (lm_head)")
@click.option("--head-bits", default="auto", show_default=True,
              help="output head width: 3..8, or 16 to keep it unquantized; auto: 8 (--bits with "
                   "--quantize-head, 16 with --any-precision; docs/format.md)")
@click.option("--embedding-bits", default="auto", show_default=True,
              help="input embedding width: 3..8 (only looked-up rows are dequantized), or 16; "
                   "auto: 8 (16 with --any-precision)")
@click.option("--head-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", *dtypes.names()]),
              help="data type of a quantized head and embedding; auto: int at 8 bits (exact "
                   "integer products on the CPU, llama.cpp's Q8_0 grid), else --dtype")
@click.option("--dtype16", default="auto", show_default=True, type=click.Choice(["auto", "fp16", "bf16"]),
              help="dtype of what stays unquantized (auto: the model's bf16, else fp16)")
@click.option("--max-shard-size", default="5GB", show_default=True,
              callback=lambda ctx, param, v: parse_size(v), help="largest shard, e.g. 5GB, 500MB")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit)")
@click.option("--trust-remote-code", is_flag=True, help="allow a Hub model's own modelling code")
@click.option("--force", is_flag=True, help="replace the output folder if it exists")
@click.option("--drop-unused", is_flag=True,
              help="drop checkpoint tensors the model has no place for (listed in the summary and "
                   "model card) instead of stopping")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO",
              help="after a successful conversion, upload the folder to this Hub repo (kbit push)")
@click.option("--any-precision", "any_precision", default=None, metavar="LO-HI",
              help="one file serving every width LO..HI (e.g. 3-8; bit planes, docs/any_precision.md)")
def convert_cmd(source, output, bits, block, dtype, exponent_bits, absmax_dtype, outliers, scales,
                importance, method, calib, calib_samples, calib_seqlen, damp, act_order, quantize_head,
                head_bits, embedding_bits, head_dtype, dtype16, max_shard_size, revision, trust_remote_code, force, drop_unused, as_json,
                push_to_hub, any_precision):
    """Quantize SOURCE (a local HF folder or a Hub id) into a kbit folder, streaming."""
    from kbitrt.convert.staging import resolve_output

    output = str(resolve_output(output))  # a symlink loop: one line, before any work
    if push_to_hub:  # no token: say so now, not after hours of converting
        from kbitrt.publish.hub import check_repo_id, resolve_token

        check_repo_id(push_to_hub)  # names no token it was given by mistake
        resolve_token(None)

    auto = None if any_precision else HEAD_BITS_DEFAULT  # one file of planes: 16-bit head
    widths = dict(head_bits=parse_bits16("--head-bits", head_bits, None if quantize_head else auto),
                  embedding_bits=parse_bits16("--embedding-bits", embedding_bits, auto))
    if any_precision and any(widths.values()):
        raise KbitFormatError("--head-bits/--embedding-bits: not with --any-precision")
    if head_dtype == "auto":  # int where every quantized one of them is 8 bits
        chosen = {b for b in widths.values() if b is not None}
        head_dtype = HEAD_DTYPE_AT_8 if chosen == {8} else None
    widths["head_dtype"] = head_dtype if any(widths.values()) and head_dtype != dtype else None
    config = QuantConfig(bits=bits, block_size=block, dtype=dtype, exponent_bits=exponent_bits,
                         absmax_dtype=absmax_dtype, outliers=outliers,
                         quantize_head=quantize_head, scales=scales, method=method,
                         importance=importance, **widths) if not any_precision else None
    kwargs = dict(force=force, dtype16=dtype16, max_shard_bytes=max_shard_size, revision=revision,
                  trust_remote_code=trust_remote_code, drop_unused=drop_unused)
    if any_precision:  # kbitrt/convert/any_precision.py
        config = _any_precision_config(any_precision, method, importance, scales, block=block,
                                       dtype=dtype, exponent_bits=exponent_bits,
                                       absmax_dtype=absmax_dtype, outliers=outliers,
                                       quantize_head=quantize_head)
    report = _run_conversion(source, output, config, method=method, importance=importance,
                             calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                             damp=damp, act_order=act_order, any_precision=bool(any_precision),
                             **kwargs)
    s = report.to_json()
    if push_to_hub:  # only reached when the conversion succeeded
        from kbitrt.publish.hub import push_folder

        s["push"] = push_folder(output, push_to_hub,
                                log=lambda m: err.print(f"[dim]{m}[/dim]")).to_json()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    if push_to_hub:
        out.print(f"pushed to {s['push']['repo_url']} (commit {s['push']['commit_oid']})")
    out.print(_table(f"kbit convert: {config.label}", _summary_rows(s, config)))


def _any_precision_config(any_precision: str, method: str, importance: str, scales: str, *,
                          block: int, dtype: str, exponent_bits: int | None, absmax_dtype: str,
                          outliers: OutlierSpec | None, quantize_head: bool) -> QuantConfig:
    """--any-precision LO-HI: the options it cannot take (one usage line each), then its config."""
    from kbitrt.convert.any_precision import cli_config

    if method != "rtn":
        raise click.UsageError("--any-precision rounds to nearest: drop --method")
    if importance != "none":
        raise click.UsageError("--any-precision takes no --importance")
    if scales != "absmax":  # the widths share one set of absmax scales
        raise click.UsageError("--any-precision stores absmax block scales: drop --scales mse")
    if dtype == "lloyd":  # the seed is a fixed data type; every width is then refined by splits
        raise click.UsageError("--any-precision refines each width's codebook itself; its "
                               "--dtype seeds it and must be a fixed data type, not lloyd")
    return cli_config(any_precision, click.get_current_context(), block_size=block, dtype=dtype,
                      exponent_bits=exponent_bits, absmax_dtype=absmax_dtype,
                      outliers=outliers, quantize_head=quantize_head)


def _run_conversion(source: str, output: str, config: QuantConfig | None, *, method: str, importance: str,
                    calib: str | None, calib_samples: int, calib_seqlen: int, damp: float,
                    act_order: bool, any_precision: bool, **kwargs):
    """The conversion the options ask for, under a byte progress bar (convert() picks rtn or
    calibration from the config; --any-precision writes every width); returns its report."""
    if any_precision:
        from kbitrt.convert.any_precision import convert_any_precision

        with byte_progress() as progress:
            return convert_any_precision(source, output, config, progress=progress, **kwargs)
    from kbitrt.convert.calibrate import Calibration
    from kbitrt.convert.converter import convert

    cal = Calibration(samples=calib_samples, seqlen=calib_seqlen, damp=damp, act_order=act_order)
    if importance == "random" and calib:  # no data: the model reads seeded random tokens
        raise click.UsageError("--importance random reads random tokens: drop --calib "
                               "(or use --importance hessian)")
    if importance != "random" and (method == "gptq" or importance == "hessian"):
        from kbitrt.eval.perplexity import load_text

        if not calib:
            raise click.UsageError(f"{'--method gptq' if method == 'gptq' else '--importance hessian'} "
                                   "needs --calib FILE (or a dataset name)")
        try:
            name, text = load_text(calib)
        except FileNotFoundError as e:
            raise click.BadParameter(str(e).replace("--ppl", "--calib"), param_hint="--calib") from None
        cal = replace(cal, text=text, name=name)
    if config.importance == "norm":
        kwargs["norm_inputs"] = _norm_inputs(source, kwargs["revision"])
    with byte_progress() as progress:
        return convert(source, output, config, calibration=cal, progress=progress, **kwargs)


def _summary_rows(s: dict, config: QuantConfig) -> list[tuple[str, str]]:
    """The rows of the conversion summary table (config: one width, or any-precision's)."""
    return ([
        ("source", s["source"]), ("output", s["output"]),
        ("parameters", f"{s['params_total']:,} total, {s['params_quantized']:,} quantized "
                       f"in {s['linears_quantized']} linears"),
        ("bits/param", f"{s['bits_per_param_quantized']:.4f} quantized linears, "
                       f"{s['bits_per_param_model']:.4f} whole model (from bytes on disk)"),
        ("size", f"{s['bytes_before'] / 1e9:.3f} GB -> {s['bytes_after'] / 1e9:.3f} GB "
                 f"({s['shards']} shard{'s' if s['shards'] > 1 else ''})"),
        ("outlier columns", str(s["outlier_columns"])),
        (f"mean rel. weight error ({config.dtype})", f"{s['mean_rel_weight_error']:.4f}"),
        ("time", f"{s['seconds']:.1f} s"),
        ("throughput", f"{s['mparams_per_s']:.1f} M params/s"),
    ] + ([("dropped (--drop-unused)", ", ".join(s["dropped_tensors"]))] if s["dropped_tensors"] else [])
      + ([("skipped buffers", f"{len(s['skipped_buffers'])} non-persistent buffers (masks, rotary "
                              "frequencies) the model recomputes")] if s["skipped_buffers"] else [])
      + [(f"width {w['bits']}", f"{w['bits_per_param_quantized']:.4f} bits/param, rel. error "
          f"{w['mean_rel_weight_error']:.4f}") for w in s.get("widths", [])])


def _norm_inputs(source: str, revision: str | None) -> dict:
    """--importance norm: which norm each linear reads (kbitrt/convert/importance.py)."""
    from kbitrt.convert.source import resolve_model
    from kbitrt.convert.importance import norm_inputs_of_folder

    found = norm_inputs_of_folder(resolve_model(source, revision))
    if not found:
        raise KbitError("--importance norm needs a pre-norm model of a native decoder family "
                        "(llama, gpt2, gpt_neox, bloom, opt): no linear of this one reads a known norm")
    return found


def _outliers(text: str | None) -> OutlierSpec | None:
    try:
        return OutlierSpec.parse(text)
    except KbitError as e:
        raise click.BadParameter(str(e).removeprefix(f"--outliers {text!r}").lstrip(": ")
                                 or str(e)) from None


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        size = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError, OverflowError):
        raise click.BadParameter(f"{text!r}: use e.g. 5GB or 500MB") from None
    if size <= 0:
        raise click.BadParameter(f"{text!r}: a shard must hold at least one byte")
    return size


@click.command("dequantize")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(), help="output folder")
@click.option("--dtype", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16", "fp32"]))
@click.option("--force", is_flag=True, help="replace the output folder if it exists")
@click.option("--json", "as_json", is_flag=True)
def dequantize_cmd(source, output, dtype, force, as_json):
    """Write a kbit model back as a plain Hugging Face model (dense 16/32-bit weights)."""
    from kbitrt.convert.dequantize import dequantize_model
    from kbitrt.convert.staging import resolve_output

    output = str(resolve_output(output))
    with byte_progress() as progress:
        s = dequantize_model(source, output, dtype, force=force,
                             progress=lambda w, d, t: progress(w, d, t) if progress else None)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        out.print(_table("kbit dequantize", [("source", s["source"]), ("output", s["output"]),
                                             ("dtype", dtype), ("size", f"{s['bytes'] / 1e9:.3f} GB")]))


def _expert_rows(experts: dict) -> list[tuple[str, str]]:
    """The inspect row of a Mixture-of-Experts model: its per-expert linears (format/experts.py)."""
    if not experts:
        return []
    per = max(x["experts"] for x in experts.values())
    return [("experts", f"{sum(x['experts'] for x in experts.values())} linears: {len(experts)} "
                        f"fused parameters x {per} experts")]


@click.command("inspect")
@click.argument("path")
@click.option("--modules", "show_modules", is_flag=True, help="list every quantized linear")
@click.option("--bits", default=None, help="any-precision models: show width K")
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", is_flag=True, help="also read every byte: each tensor against its CRC-32 "
              "(written by kbit convert) and every linear's block scales")
def inspect_cmd(path, show_modules, as_json, bits=None, verify=False):
    """Validate a kbit model and show what is in it."""
    from kbitrt.convert.source import resolve_model
    from kbitrt.format.reader import KbitModel

    km = KbitModel.open(resolve_model(path), verify=False)
    verified = km.verify() if verify else None
    if bits is not None:  # kbitrt/runtime/any_precision.py
        from kbitrt.runtime.any_precision import select_width
        km = select_width(km, int(bits) if str(bits).isdigit() else bits)
    s = km.summary()
    if verified is not None:
        s["verified"] = verified
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    qc = s["quantization"]
    out.print(_table(f"kbit model: {s['label']}", [
        ("path", s["path"]), ("architecture", f"{s['model_type']} {s['architectures'] or ''}"),
        ("format", f"version {qc['format_version']}, packing {qc['packing']}"),
        ("data type", f"{qc['dtype']}{qc['bits']}" + (f" E{qc['exponent_bits']}M{qc['bits'] - 1 - qc['exponent_bits']}"
                                                     if qc.get("exponent_bits") else "")),
        ("block / absmax", f"{qc['block_size']} / {qc['absmax_dtype']}"),
        ("outliers", f"{qc.get('outliers') or 'none'} ({s['outlier_columns']} columns)"),
        ("quantized linears", str(s["linears_quantized"])),
    ] + _expert_rows(s.get("experts") or {}) + [
        ("kept in 16 bit", ", ".join(s["modules_not_quantized"]) or "-"),
        ("parameters", f"{s['params_total']:,} total, {s['params_quantized']:,} quantized"),
        ("bits/param", f"{s['bits_per_param_quantized']:.4f} quantized, {s['bits_per_param_model']:.4f} model"),
        ("size", f"{s['file_bytes'] / 1e9:.3f} GB in {s['shards']} shard(s)"),
    ] + [(f"width {w['bits']}", f"{w['bits_per_param_quantized']:.4f} bits/param quantized, "
          f"{w['bits_per_param_model']:.4f} model") for w in s.get("widths", [])]
        + ([("verified", f"{verified['tensors_checksummed']} tensors match their CRC-32"
             + (f"; no checksums in {', '.join(verified['shards_without_checksums'])}"
                if verified["shards_without_checksums"] else "")
             + f"; block scales of {verified['linears_scales_checked']} linears finite")]
           if verified is not None else [])))
    if show_modules:
        t = Table("module", "out", "in", "outliers")
        for m in s["modules"]:
            t.add_row(m["name"], str(m["out_features"]), str(m["in_features"]), str(m["outliers"]))
        out.print(t)
