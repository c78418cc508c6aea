"""The streaming converter: a plain HF causal LM in, a kbit folder out, a few tensors in memory.

Every output tensor's name, dtype and shape is planned before any data is read (outlier columns,
when asked for, are chosen by a statistics pass first), so each shard's header is written up front
and every quantized row chunk is written once, at its final offset. Large linears are processed in
row chunks of about CHUNK_ELEMS values; only GPT-2's Conv1D weights (stored (in, out), so a row of
the linear is a column on disk) are read whole, and those models are small.

Output is written into a hidden sibling folder and renamed into place at the end: an interrupted
or failed conversion leaves no folder that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kbitrt.format import blockwise, dtypes, quantizer
from kbitrt.convert.calibrate import Calibration, calibrate, check_calibration, needs_calibration
from kbitrt.convert.card import write_model_card
from kbitrt.convert.checkpoint import CheckpointTensors
from kbitrt.convert.experts import ExpertTensors
from kbitrt.convert.model_map import ModelMap, build_model_map, skip_reason
from kbitrt.format.safetensors_io import DTYPE_NAMES, PlannedTensor, ShardWriter, plan_shards
from kbitrt.convert.source import companion_files, find_checkpoint, read_config, resolve_model
from kbitrt.convert.staging import check_output, staged_folder
from kbitrt.format.model_check import check_checkpoint_shapes
from kbitrt.format.config import (ABSMAX, ABSMAX_OFFSET, ABSMAX_SCALE, CODEBOOK, OUTLIER_IDX,
                                 OUTLIER_WEIGHT, QWEIGHT, SHAPE, KbitFormatError, LinearLayout,
                                 QuantConfig, header_metadata, replace)

CHUNK_ELEMS = 1 << 24
MAX_SHARD_BYTES = 5 * 10**9
Progress = Callable[[str, int, int], None]  # (what, bytes done, bytes total)


@dataclass
class LinearPlan:
    module: str
    source: str  # checkpoint key of the weight
    transposed: bool
    layout: LinearLayout
    outlier_idx: torch.Tensor


@dataclass
class ConversionReport:
    source: str
    output: str
    config: QuantConfig
    dtype16: str
    params_total: int = 0
    params_quantized: int = 0
    linears_quantized: int = 0
    bytes_before: int = 0  # tensor bytes of the source checkpoint
    bytes_after: int = 0  # tensor bytes written
    bytes_quantized: int = 0  # bytes of everything that stores the quantized linears
    outlier_columns: int = 0
    rel_error_sum: float = 0.0
    shards: int = 0
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def bits_per_param_quantized(self) -> float:
        """Exact bits per quantized weight: codes, scales, codebooks, outliers, shapes (from bytes)."""
        return 8 * self.bytes_quantized / max(self.params_quantized, 1)

    @property
    def bits_per_param_model(self) -> float:
        return 8 * self.bytes_after / max(self.params_total, 1)

    @property
    def rel_error_mean(self) -> float:
        return self.rel_error_sum / max(self.linears_quantized, 1)

    def to_json(self) -> dict:
        return {
            "source": self.source, "output": self.output, "quantization": self.config.to_json(),
            "label": self.config.label, "dtype16": self.dtype16,
            "params_total": self.params_total, "params_quantized": self.params_quantized,
            "linears_quantized": self.linears_quantized,
            "bits_per_param_quantized": round(self.bits_per_param_quantized, 6),
            "bits_per_param_model": round(self.bits_per_param_model, 6),
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "outlier_columns": self.outlier_columns,
            "mean_rel_weight_error": round(self.rel_error_mean, 6),
            "shards": self.shards, "seconds": round(self.seconds, 3),
            "mparams_per_s": round(self.params_quantized / max(self.seconds, 1e-9) / 1e6, 3),
            "dropped_tensors": self.dropped, "skipped_buffers": self.skipped,
        }


def pick_dtype16(choice: str, raw_config: dict) -> torch.dtype:
    """16-bit dtype of what is not quantized: as asked, else the model's own 16-bit dtype, else fp16."""
    if choice in ("fp16", "float16"):
        return torch.float16
    if choice in ("bf16", "bfloat16"):
        return torch.bfloat16
    if choice != "auto":
        raise KbitFormatError(f"--dtype16 {choice!r}: use auto, fp16 or bf16")
    declared = str(raw_config.get("dtype") or raw_config.get("torch_dtype") or "")
    return torch.bfloat16 if "bfloat16" in declared else torch.float16


def _stat_rows(tensors: CheckpointTensors, key: str, transposed: bool):
    """Yields (r0, r1, float32 rows of the (N, K) linear weight) in chunks."""
    if transposed:
        w = tensors.read(key).t().contiguous()
        n, k = w.shape
        step = max(1, CHUNK_ELEMS // max(k, 1))
        for r0 in range(0, n, step):
            yield r0, min(n, r0 + step), w[r0: r0 + step].float()
        return
    n, k = tensors.shape(key)
    step = max(1, CHUNK_ELEMS // max(k, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        yield r0, r1, tensors.read(key, (r0, r1)).float()


def _column_std(tensors: CheckpointTensors, key: str, transposed: bool) -> torch.Tensor:
    total = sq = None
    count = 0
    for _, _, w in _stat_rows(tensors, key, transposed):
        blockwise.check_finite(w, key)
        s, q = w.double().sum(0), w.double().square().sum(0)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += w.shape[0]
    mean = total / count
    return (sq / count - mean.square()).clamp(min=0).sqrt()


class Converter:
    report_class = ConversionReport

    def __init__(self, folder: Path, config: QuantConfig, dtype16: torch.dtype,
                 trust_remote_code: bool = False, drop_unused: bool = False, overrides=None,
                 extra_quantization: dict | None = None, norm_inputs: dict | None = None):
        self.overrides = overrides  # module -> QuantizedWeight computed elsewhere (GPTQ)
        # --importance norm: linear module -> the norm module whose output it reads
        self.norm_inputs = norm_inputs or {}
        self.extra_quantization = extra_quantization or {}  # more quantization_config keys
        self.folder = folder
        self.config = config
        self.dtype16 = dtype16
        self.raw_config = read_config(folder)
        if "quantization_config" in self.raw_config:
            qc = self.raw_config["quantization_config"]
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise KbitFormatError(f"{folder} is already quantized (quant_method {method!r}): "
                                  "convert from the model's 16/32-bit checkpoint")
        self.tensors = CheckpointTensors(find_checkpoint(folder))
        self.map: ModelMap = build_model_map(folder, trust_remote_code)
        self.linears: list[LinearPlan] = []
        self.plain: dict[str, str] = {}  # output name -> checkpoint key
        self.dropped: list[str] = []  # unused tensors dropped on purpose (--drop-unused)
        self.skipped: list[str] = []  # known non-persistent buffers (model_map.SKIPPABLE_BUFFERS)
        self.drop_unused = drop_unused
        self._placed: dict[str, str] = {}  # checkpoint key -> model name
        if self.map.experts:  # MoE: one linear per expert and fused parameter (convert/experts.py)
            self.tensors = ExpertTensors(self.tensors, self.map)

    def plan(self, progress: Progress | None = None) -> None:
        """Decide what every checkpoint tensor becomes; outlier statistics are gathered here.

        Every source tensor is accounted for: converted, skipped as a known non-persistent buffer
        (model_map.SKIPPABLE_BUFFERS), or, with `drop_unused`, dropped on purpose and listed.
        Anything else stops the conversion here, before a byte is written, naming the tensors."""
        mm, cfg = self.map, self.config
        weights: dict[str, str] = {}  # module -> checkpoint key of its weight
        placed: dict[str, str] = {}  # model name -> checkpoint key
        unused, fused = [], []
        for key in self.tensors.names():
            need = mm.needs_conversion(key)
            if need is not None:
                fused.append(f"{key} ({need})")
                continue
            name = mm.canonical(key)
            if name is None:
                (self.skipped if skip_reason(key) else unused).append(key)
                continue
            if name in placed:
                raise KbitFormatError(
                    f"{self.folder}: checkpoint tensors {placed[name]} and {key} are both "
                    f"{name} for transformers: remove one of them from the checkpoint")
            placed[name] = key
            self._placed[key] = name
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module in mm.linears and len(self.tensors.shape(key)) == 2 \
                    and (module != mm.head or cfg.head_quantized):
                weights[module] = key
            elif not (mm.tied and module == mm.head and leaf == "weight"):
                self.plain[name] = key
        if fused:
            raise KbitFormatError(
                f"{self.folder}: {len(fused)} tensors need transformers' fusing conversion, which "
                f"kbitrt does not apply (e.g. {', '.join(fused[:3])}); nothing was written")
        if unused and not self.drop_unused:
            raise KbitFormatError(
                f"{self.folder}: {len(unused)} checkpoint tensors have no place in a "
                f"{mm.model_type!r} model as transformers builds it: {_names(unused)}; nothing was "
                "written. Check the config, or pass --drop-unused to drop them on purpose")
        self.dropped = unused
        missing = sorted(p for p in mm.params if p not in placed
                         and not (mm.tied and mm.head and p == f"{mm.head}.weight"))
        if missing:
            raise KbitFormatError(
                f"{self.folder}: the checkpoint lacks {len(missing)} weights the {mm.model_type!r} "
                f"model needs: {_names(missing)}; nothing was written")
        check_checkpoint_shapes(self.folder, self.raw_config, {**self.plain, **{  # model_check.py
            f"{m}.weight": k for m, k in weights.items()}}, self.tensors.shape)
        self._plan_head_and_embedding(weights)
        if not weights:
            raise KbitFormatError(
                f"{self.folder}: no linear layers found in the checkpoint (model_type "
                f"{mm.model_type!r}); nothing to quantize")
        total = sum(self.tensors.nbytes(k) for k in weights.values()) if cfg.outliers else 0
        done = 0
        for module in sorted(weights):
            key = weights[module]
            transposed = mm.linears.get(module, False)  # the embedding is (vocab, dim)
            shape = self.tensors.shape(key)
            n, k = (shape[1], shape[0]) if transposed else shape
            idx = torch.zeros(0, dtype=torch.int64)
            if cfg.outliers:
                idx = blockwise.outliers_from_std(_column_std(self.tensors, key, transposed),
                                                  cfg.outliers)
                done += self.tensors.nbytes(key)
                if progress:
                    progress("outlier statistics", done, total)
            own = self.config.for_module(module)
            layout = LinearLayout(n, k, own, n_outliers=idx.numel(),
                                  codebook_len=dtypes.codebook_len(own))
            self.linears.append(LinearPlan(module, key, transposed, layout, idx))

    def _plan_head_and_embedding(self, weights: dict[str, str]) -> None:
        """The output head and the input embedding at their own widths (head_bits,
        embedding_bits) and data type (head_dtype), recorded in module_bits and module_dtypes.
        A tied pair at one width is stored once, as the
        embedding, and read by both; otherwise a tied head is a copy of the embedding."""
        mm, cfg = self.map, self.config
        emb_module = mm.embedding_key.rpartition(".")[0] if mm.embedding_key else None
        emb_key = next((k for k, name in self._placed.items() if name == mm.embedding_key), None)
        head_bits = cfg.head_bits or cfg.bits
        shared = mm.tied and cfg.head_quantized and cfg.embedding_bits == head_bits
        if cfg.embedding_bits is not None and emb_module and emb_key:
            weights[emb_module] = emb_key
            self.plain.pop(mm.embedding_key, None)
            if mm.tied and mm.head and not cfg.head_quantized:  # the 16-bit head keeps a copy
                self.plain[f"{mm.head}.weight"] = emb_key
        if cfg.head_quantized and mm.head and mm.head not in weights and mm.tied and emb_key \
                and not shared:  # a tied head has no tensor of its own: quantize a copy
            weights[mm.head] = emb_key
        bits = {emb_module: cfg.embedding_bits} if emb_module in weights else {}
        if mm.head in weights:
            bits[mm.head] = head_bits
        own = tuple(sorted((m, b) for m, b in bits.items() if b is not None and b != cfg.bits))
        typed = {emb_module} | ({mm.head} if cfg.head_bits is not None else set())  # not --quantize-head's
        types = tuple(sorted((m, cfg.head_dtype) for m, b in bits.items()
                             if b is not None and m in typed and cfg.head_dtype not in (None, cfg.dtype)))
        if own or types:
            self.config = replace(cfg, module_bits=own, module_dtypes=types)

    def planned_tensors(self) -> list[PlannedTensor]:
        out = []
        d16 = DTYPE_NAMES[self.dtype16]
        for lp in self.linears:
            for suffix, (dtype, shape) in lp.layout.tensor_specs(d16).items():
                out.append(PlannedTensor(f"{lp.module}.{suffix}", dtype, shape))
        for name, key in self.plain.items():
            src = self.tensors.dtype(key)
            dtype = self.dtype16 if src.is_floating_point else src
            out.append(PlannedTensor(name, DTYPE_NAMES[dtype], self.tensors.shape(key)))
        return sorted(out, key=lambda t: t.name)

    def finish_report(self, report: ConversionReport) -> None:
        """Add what a subclass measures to the report once every tensor is written."""

    def finish_folder(self, folder: Path, report: ConversionReport) -> None:
        """Add what a subclass writes beside the model card, before the folder moves into place."""

    def output_config(self) -> dict:
        cfg = dict(self.raw_config)
        qc = self.config.to_json()
        qc["modules_not_quantized"] = sorted(m for m in self.map.linears
                                             if m not in {lp.module for lp in self.linears})
        qc["transposed_modules"] = sorted(lp.module for lp in self.linears if lp.transposed)
        qc.update(self.extra_quantization)
        cfg["quantization_config"] = qc
        cfg["dtype"] = "bfloat16" if self.dtype16 == torch.bfloat16 else "float16"
        cfg.pop("torch_dtype", None)
        mm = self.map
        if mm.tied and mm.head and (mm.head in {lp.module for lp in self.linears}
                                    or f"{mm.head}.weight" in self.plain):
            cfg["tie_word_embeddings"] = False  # the head is now a tensor of its own
        return cfg

    def write(self, tmp: Path, report: ConversionReport, max_shard_bytes: int,
              progress: Progress | None = None) -> None:
        planned = self.planned_tensors()
        shards = plan_shards(planned, max_shard_bytes)
        count = len(shards)
        meta = header_metadata(self.config)
        writers: dict[str, ShardWriter] = {}
        for fname, group in shards:
            w = ShardWriter(tmp / fname, group, meta)
            for t in group:
                writers[t.name] = w
        total_in = sum(self.tensors.nbytes(lp.source) for lp in self.linears) + \
            sum(self.tensors.nbytes(k) for k in self.plain.values())
        done = 0
        for lp in self.linears:
            self._write_linear(lp, writers, report)
            done += self.tensors.nbytes(lp.source)
            if progress:
                progress(lp.module, done, total_in)
        for name, key in sorted(self.plain.items()):
            self._copy_plain(name, key, writers[name])
            done += self.tensors.nbytes(key)
            if progress:
                progress(name, done, total_in)
        for w in {id(w): w for w in writers.values()}.values():
            w.close()
        if count > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                     "weight_map": {t.name: writers[t.name].path.name for t in planned}}
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n")
        report.shards = count
        report.bytes_after = sum(t.nbytes for t in planned)
        report.bytes_quantized = sum(t.nbytes for t in planned
                                     if t.name.rpartition(".")[0] in {lp.module for lp in self.linears}
                                     and t.name.rpartition(".")[2] != "bias")

    def _copy_plain(self, name: str, key: str, writer: ShardWriter) -> None:
        """Copy a tensor that stays 16-bit in row chunks (a 250k-row embedding is GBs)."""
        shape = self.tensors.shape(key)
        if not shape or not shape[0]:
            t = self.tensors.read(key)
            writer.write(name, self._to16(t, key) if t.is_floating_point() else t)
            return
        row = _numel(shape[1:])
        step = max(1, CHUNK_ELEMS // max(row, 1))
        for r0 in range(0, shape[0], step):
            t = self.tensors.read(key, (r0, min(shape[0], r0 + step)))
            t = self._to16(t, key) if t.is_floating_point() else t
            writer.write(name, t, r0 * row * t.element_size())

    def _to16(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """Cast to the 16-bit dtype; a NaN/Inf in the source, or a value that overflows, is refused."""
        blockwise.check_finite(t, key)
        out = t.to(self.dtype16)
        if not bool(torch.isfinite(out).all()):
            big = t.float().abs().max().item()
            raise KbitFormatError(
                f"{key}: |value| up to {big:.4g} overflows {DTYPE_NAMES[self.dtype16]} (max "
                f"{torch.finfo(self.dtype16).max:.4g}): convert with --dtype16 bf16; nothing was written")
        return out

    def _write_linear(self, lp: LinearPlan, writers: dict[str, ShardWriter],
                      report: ConversionReport) -> None:
        cfg, lay, name = self.config.for_module(lp.module), lp.layout, lp.module
        idx = lp.outlier_idx
        if self.overrides is not None and name in self.overrides:
            return self._write_given(lp, self.overrides[name], writers, report)

        def rows():
            for r0, r1, w in _stat_rows(self.tensors, lp.source, lp.transposed):
                blockwise.check_finite(w, lp.source)
                yield r0, w

        def write(suffix: str, t: torch.Tensor, row0: int = 0) -> None:
            writers[f"{name}.{suffix}"].write(f"{name}.{suffix}", t,
                                              row0 * t[0].numel() * t.element_size() if row0 else 0)

        q = quantizer.MatrixQuantizer(cfg, (lay.out_features, lay.in_features), lp.source,
                                      idx if idx.numel() else None, self.dtype16,
                                      importance=self._importance(name, lay.in_features))
        for _ in range(q.passes):  # block scales (and the weight sample) before any code is chosen
            for r0, w in rows():
                q.observe(r0, w)
            q.finish_observing()
        if cfg.absmax_dtype == "dq8":  # the 8-bit scale codes span the matrix: known by now
            write(ABSMAX, q.stored)
            write(ABSMAX_SCALE, q.scale)
            write(ABSMAX_OFFSET, q.offset)
        err = norm = 0.0
        for r0, w in rows():
            part = q.quantize(r0, w)
            if cfg.absmax_dtype != "dq8":
                write(ABSMAX, part.absmax, r0)
            write(QWEIGHT, part.qweight, r0)
            if part.outlier_weight is not None:
                write(OUTLIER_WEIGHT, part.outlier_weight, r0)
                w[:, idx] = part.outlier_weight.float()
            err += (part.dequantize() - w).square().sum().item()
            norm += w.square().sum().item()
        write(CODEBOOK, q.codebook.float())
        write(SHAPE, torch.tensor([lay.out_features, lay.in_features]))
        if idx.numel():
            write(OUTLIER_IDX, idx)
        report.params_quantized += lay.out_features * lay.in_features
        report.linears_quantized += 1
        report.outlier_columns += idx.numel()
        report.rel_error_sum += (err / norm) ** 0.5 if norm > 0 else 0.0

    def _importance(self, module: str, k: int) -> torch.Tensor | None:
        """--importance norm: the squared gain (K,) of the norm `module` reads, None for uniform."""
        if self.config.importance in ("hessian", "random") and self.overrides is None:
            raise KbitFormatError(f"--importance {self.config.importance} needs the model's forward "
                                  "on calibration tokens: convert() runs it (kbit convert does)")
        if self.config.importance != "norm" or module not in self.norm_inputs:
            return None
        if not hasattr(self, "_by_canonical"):
            self._by_canonical = {self.map.canonical(key): key for key in self.tensors.names()}
        keys = self._by_canonical
        for norm in self.norm_inputs[module].split("|"):  # alternative names, as in the spec
            if f"{norm}.weight" in keys:
                gain = self.tensors.read(keys[f"{norm}.weight"]).float().reshape(-1)
                if gain.numel() != k:
                    raise KbitFormatError(f"{module}: its norm {norm} has {gain.numel()} gains for "
                                          f"{k} input columns")
                return gain.square()
        raise KbitFormatError(f"{module}: the checkpoint lacks the weight of its norm "
                              f"{self.norm_inputs[module]!r}")

    def _write_given(self, lp: LinearPlan, qw: blockwise.QuantizedWeight,
                     writers: dict[str, ShardWriter], report: ConversionReport) -> None:
        """Write a linear quantized elsewhere (GPTQ), after checking it matches the plan."""
        name, lay = lp.module, lp.layout
        given = {QWEIGHT: qw.qweight, ABSMAX: qw.absmax, ABSMAX_SCALE: qw.absmax_scale,
                 ABSMAX_OFFSET: qw.absmax_offset, CODEBOOK: qw.codebook.float(),
                 SHAPE: torch.tensor([lay.out_features, lay.in_features]),
                 OUTLIER_IDX: qw.outlier_idx, OUTLIER_WEIGHT: qw.outlier_weight}
        specs = lay.tensor_specs(DTYPE_NAMES[self.dtype16])
        for suffix, (_, shape) in specs.items():
            t = given[suffix]
            if t is None or tuple(t.shape) != tuple(shape):
                raise KbitFormatError(f"{name}: the given {suffix} does not match the planned "
                                      f"shape {shape}")
            writers[f"{name}.{suffix}"].write(f"{name}.{suffix}", t.contiguous())
        if lp.outlier_idx.numel() and not torch.equal(qw.outlier_idx, lp.outlier_idx):
            raise KbitFormatError(f"{name}: the given outlier columns differ from the planned ones")
        err = norm = 0.0
        deq = qw.dequantize()
        for r0, r1, w in _stat_rows(self.tensors, lp.source, lp.transposed):
            err += (deq[r0:r1] - w).square().sum().item()
            norm += w.square().sum().item()
        report.params_quantized += lay.out_features * lay.in_features
        report.linears_quantized += 1
        report.outlier_columns += lp.outlier_idx.numel()
        report.rel_error_sum += (err / norm) ** 0.5 if norm > 0 else 0.0


def convert(source: str | os.PathLike, output: str | os.PathLike, config: QuantConfig, *,
            force: bool = False, dtype16: str = "auto", max_shard_bytes: int = MAX_SHARD_BYTES,
            revision: str | None = None, trust_remote_code: bool = False,
            drop_unused: bool = False, progress: Progress | None = None,
            converter: type[Converter] | None = None, overrides=None,
            extra_quantization: dict | None = None, norm_inputs: dict | None = None,
            calibration: Calibration | None = None, head_bits: int | None = None,
            embedding_bits: int | None = None) -> ConversionReport:
    """Convert a local folder or Hub id into a kbit folder at `output`; returns the summary.

    The one place the method is picked: a config that calibrates (`config.method == "gptq"`,
    `--importance hessian|random`, calibrate.needs_calibration) runs the model's forward on
    `calibration` (default: random tokens) and writes what that quantized; every other config
    streams round-to-nearest. `converter` is the Converter subclass that writes the quantized
    linears (any-precision models use their own); everything else (validation, staging,
    sharding, card) is shared. `overrides` are linears quantized elsewhere, `extra_quantization`
    more quantization_config keys, `norm_inputs` (linear module -> norm module,
    kbitrt.convert.importance) the norms whose squared gains weight each input column's error
    with `config.importance == "norm"`. `head_bits` / `embedding_bits` (3..8) set config's
    widths of the output head and the input embedding."""
    if head_bits is not None or embedding_bits is not None:
        config = replace(config, head_bits=head_bits or config.head_bits,
                         embedding_bits=embedding_bits or config.embedding_bits)
    if overrides is None and needs_calibration(config):
        calibration = calibration or Calibration()  # default: seeded random tokens
        check_calibration(config, calibration)
        results, record = calibrate(_checked_source(source, output, revision, force), config,
                                    calibration, trust_remote_code=trust_remote_code,
                                    progress=progress)
        try:
            return convert(source, output, config, force=force, dtype16=dtype16,
                           max_shard_bytes=max_shard_bytes, revision=revision,
                           trust_remote_code=trust_remote_code, drop_unused=drop_unused,
                           progress=progress, converter=converter, overrides=results,
                           extra_quantization={**record, **(extra_quantization or {})},
                           norm_inputs=norm_inputs)
        finally:
            results.close()
    out = Path(output).expanduser().resolve()
    folder = _checked_source(source, output, revision, force)
    start = time.perf_counter()
    raw = read_config(folder)
    conv = (converter or Converter)(folder, config, pick_dtype16(dtype16, raw), trust_remote_code,
                                    drop_unused, overrides, extra_quantization,
                                    **({"norm_inputs": norm_inputs} if norm_inputs else {}))
    report = conv.report_class(str(source), str(out), config, str(conv.dtype16).replace("torch.", ""))
    conv.plan(progress)  # refuses unplaced tensors before anything is written
    with staged_folder(out, force=force) as tmp:
        conv.write(tmp, report, max_shard_bytes, progress)
        report.dropped = conv.dropped
        report.params_total = sum(_numel(conv.tensors.shape(k)) for k in conv.plain.values()) + \
            report.params_quantized
        report.skipped = conv.skipped
        gone = set(conv.dropped) | set(conv.skipped)
        report.bytes_before = sum(conv.tensors.nbytes(k) for k in conv.tensors.names() if k not in gone)
        conv.finish_report(report)
        (tmp / "config.json").write_text(json.dumps(conv.output_config(), indent=2, sort_keys=True) + "\n")
        for f in companion_files(folder):
            shutil.copyfile(f, tmp / f.name)
        report.seconds = time.perf_counter() - start
        write_model_card(tmp, conv.output_config(), report.to_json(), base_model=str(source))
        conv.finish_folder(tmp, report)
    return report


def _checked_source(source, output, revision: str | None, force: bool) -> Path:
    """The source's local folder, once the output folder is known to be writable (before hours
    of work)."""
    folder = resolve_model(source, revision)
    check_output(folder, Path(output).expanduser().resolve(), force)
    return folder


def _names(keys: list[str], show: int = 6) -> str:
    return ", ".join(keys[:show]) + (f" and {len(keys) - show} more" if len(keys) > show else "")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
