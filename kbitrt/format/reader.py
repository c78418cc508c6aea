"""The one reader of kbit folders: `kbit inspect`, `kbit dequantize` and the runtime all use it.

Opening validates everything that can be checked without reading weights: the quantization_config
(known format_version and packing), every shard's header and size (truncation), the format
metadata in each header, and, for every quantized linear, that its tensors exist with the dtypes
and shapes its recorded (N, K) and the settings imply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kbitrt.format import dtypes
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.model_check import check_against_model
from kbitrt.format.safetensors_io import SafetensorsFile
from kbitrt.format.stored_model import StoredModel, format_error, open_shards, read_json
from kbitrt.format.config import (CODEBOOK, OUTLIER_IDX, QUANT_SUFFIXES, QWEIGHT,
                                 SHAPE, KbitFormatError, LinearLayout, QuantConfig)


@dataclass
class ModuleEntry:
    name: str
    out_features: int
    in_features: int
    n_outliers: int


# config.json `dtype` -> dtype of every floating tensor kept unquantized (kbit convert writes 16 bit;
# a model loaded in fp32 through transformers and saved again keeps fp32)
FLOAT16 = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
PLAIN_INT_DTYPES = ("I64", "I32", "U8", "BOOL")  # integer buffers a model may carry (ids, masks)
_fail = format_error  # every check below raises it: where, what, what to do


class KbitModel(StoredModel):
    def __init__(self, path: Path, config: dict, quant: QuantConfig,
                 files: dict[str, SafetensorsFile], check_model: bool = True):
        super().__init__(path, config, quant, files)
        self.dtype16 = _dtype16(path, config)
        with torch.device("cpu"):  # callers may open a folder inside a meta-device context
            self._validate()
            if check_model:
                check_against_model(self)

    @classmethod
    def open(cls, path: str | Path, check_model: bool = True) -> KbitModel:
        """Open and validate a kbit folder; every violation is one KbitFormatError naming the file,
        the tensor and what to do (docs/format.md lists the checks). `check_model=False` leaves out
        the check against the architecture transformers builds (model_check.py: it imports the
        model's code), for callers that check every name and shape themselves (the native decoder)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise KbitFormatError(f"{path}: no such folder")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise KbitFormatError(f"{path} has no config.json: not a model folder")
        config = read_json(cfg_path)
        if not isinstance(config, dict):
            raise _fail(cfg_path, "is not a JSON object")
        qc = config.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "kbit":
            raise KbitFormatError(f"{path} is not a kbit model (config.json has no kbit "
                                  "quantization_config): convert it first with `kbit convert`")
        if qc.get("packing") == "bitplane-v1":  # any-precision: kbitrt/format/bitplane.py
            from kbitrt.format.bitplane import BitplaneModel
            return BitplaneModel.open(path, config)
        try:
            quant = QuantConfig.from_json(qc)
        except KbitFormatError as e:
            raise KbitFormatError(f"{cfg_path}: {e}") from None
        files = open_shards(path, quant, QuantConfig.from_json)
        return cls(path, config, quant, files, check_model)

    def _validate(self) -> None:
        qc = self.config["quantization_config"]
        by_module: dict[str, set[str]] = {}
        for name in self._file_of:
            module, _, suffix = name.rpartition(".")
            if suffix in QUANT_SUFFIXES:
                by_module.setdefault(module, set()).add(suffix)
        for module in sorted(by_module):
            if QWEIGHT not in by_module[module]:
                extra = sorted(by_module[module])[0]
                raise _fail(self.file_path(f"{module}.{extra}"), f"tensor {module}.{extra} belongs to "
                            f"no quantized linear ({module}.{QWEIGHT} is missing)")
            self.modules[module] = self._validate_linear(module, by_module[module])
        if not self.modules:
            raise KbitFormatError(f"{self.path}: no quantized linears found: convert the model again")
        for name in self.plain_names:
            dtype = self.info(name).dtype
            if dtype in ("F16", "BF16", "F32", "F64"):
                if dtype != self.dtype16:
                    raise _fail(self.file_path(name), f"tensor {name} is {dtype}, but config.json "
                                f"says the model's 16-bit dtype is {self.dtype16}")
            elif dtype not in PLAIN_INT_DTYPES:
                raise _fail(self.file_path(name), f"tensor {name} has dtype {dtype}, which no kbit "
                                               "model stores")
        not_quantized = qc.get("modules_not_quantized") or []
        for key, names, bad in (("transposed_modules", self.transposed,
                                 lambda m: m not in self.modules),
                                ("modules_not_quantized", not_quantized, lambda m: m in self.modules)):
            wrong = sorted(m for m in names if bad(m))
            if wrong:
                raise _fail(self.path / "config.json", f"quantization_config.{key} names "
                            f"{wrong[0]}, which is {'not ' if key == 'transposed_modules' else ''}"
                            "a quantized linear of this folder")

    def _validate_linear(self, module: str, has: set[str]) -> ModuleEntry:
        q = self.quant
        shape_name = f"{module}.{SHAPE}"
        if SHAPE not in has:
            raise _fail(self.file_path(f"{module}.{QWEIGHT}"), f"{module} has no {SHAPE} tensor")
        info = self.info(shape_name)
        if info.dtype != "I64" or info.shape != (2,):
            raise _fail(self.file_path(shape_name), f"{shape_name} is {info.dtype}{list(info.shape)}, "
                                                 "expected I64[2]")
        n, k = (int(v) for v in self.read(shape_name).tolist())
        if not (0 < n < 2**31 and 0 < k < 2**31):
            raise _fail(self.file_path(shape_name), f"{shape_name} holds ({n}, {k}), not a linear's shape")
        n_out = 0
        if OUTLIER_IDX in has:
            oi = self.info(f"{module}.{OUTLIER_IDX}")
            n_out = oi.shape[0] if len(oi.shape) == 1 and oi.shape[0] < k else -1
            if n_out <= 0:
                raise _fail(self.file_path(f"{module}.{OUTLIER_IDX}"), f"{module}.{OUTLIER_IDX} has "
                            f"shape {list(oi.shape)}: expected 1 to {k - 1} column indices")
        cb_len = self.info(f"{module}.{CODEBOOK}").shape[0] \
            if CODEBOOK in has and len(self.info(f"{module}.{CODEBOOK}").shape) == 1 else 0
        fixed = dtypes.codebook_len(q)
        if not (2 <= cb_len <= 2**q.bits) or (q.dtype != "quantile" and cb_len != fixed):
            raise _fail(self.file_path(f"{module}.{QWEIGHT}"), f"{module}.{CODEBOOK} missing or has "
                        f"{cb_len} entries ({fixed if q.dtype != 'quantile' else f'at most {2**q.bits}'} "
                        f"for {q.dtype}{q.bits})")
        layout = LinearLayout(n, k, q, n_outliers=n_out, codebook_len=cb_len)
        specs = layout.tensor_specs(self.dtype16)
        for suffix in sorted(has - set(specs)):
            raise _fail(self.file_path(f"{module}.{suffix}"), f"tensor {module}.{suffix} does not belong "
                        f"to a {q.label} linear{' without outliers' if not n_out else ''}")
        for suffix, (dtype, shape) in specs.items():
            full = f"{module}.{suffix}"
            if full not in self._file_of:
                raise _fail(self.path, f"tensor {full} is missing")
            info = self.info(full)
            if info.shape != tuple(shape) or info.dtype != dtype:
                raise _fail(self.file_path(full), f"{full} is {info.dtype}{list(info.shape)}, expected "
                            f"{dtype}{list(shape)} for a ({n}, {k}) linear at {q.label}")
        cb = self.read(f"{module}.{CODEBOOK}")
        entries = cb.tolist()  # at most 256: plain Python, no tensor ops for a load to page in
        if not all(math.isfinite(e) and abs(e) <= 1 for e in entries) \
                or any(hi <= lo for lo, hi in zip(entries, entries[1:])):
            raise _fail(self.file_path(f"{module}.{CODEBOOK}"), f"{module}.{CODEBOOK} is not a sorted "
                        "codebook of distinct finite values in [-1, 1]")
        if n_out:
            idx = self.read(f"{module}.{OUTLIER_IDX}")
            if int(idx.min()) < 0 or int(idx.max()) >= k or bool((idx[1:] <= idx[:-1]).any()):
                raise _fail(self.file_path(f"{module}.{OUTLIER_IDX}"), f"{module}.{OUTLIER_IDX} must be "
                            f"strictly increasing column indices in [0, {k})")
        return ModuleEntry(module, n, k, n_out)

    def quantized(self, module: str) -> QuantizedWeight:
        e = self.modules[module]
        tensors = {s: self.read(f"{module}.{s}") for s in self.suffixes(module) if s != SHAPE}
        return QuantizedWeight.from_tensors(tensors, self.quant, (e.out_features, e.in_features))


def _dtype16(path: Path, config: dict) -> str:
    """The safetensors dtype of everything kept in 16 bit, from config.json's `dtype`."""
    declared = config.get("dtype", config.get("torch_dtype"))
    if declared not in FLOAT16:
        raise _fail(path / "config.json", f"dtype is {declared!r}: a kbit model says float16, "
                                          "bfloat16 or float32 for what it keeps unquantized")
    return FLOAT16[declared]
