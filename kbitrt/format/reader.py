"""The one reader of kbit folders: `kbit inspect`, `kbit dequantize` and the runtime all use it.

Opening validates everything that can be checked without reading weights: the quantization_config
(known format_version and packing), every shard's header and size (truncation), the format
metadata in each header, and, for every quantized linear, that its tensors exist with the dtypes
and shapes its recorded (N, K) and the settings imply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.safetensors_io import SafetensorsFile
from kbitrt.format.config import (CODEBOOK, OUTLIER_IDX, OUTLIER_WEIGHT, QUANT_SUFFIXES, QWEIGHT,
                                 SHAPE, KbitFormatError, LinearLayout, QuantConfig)


@dataclass
class ModuleEntry:
    name: str
    out_features: int
    in_features: int
    n_outliers: int


class KbitModel:
    def __init__(self, path: Path, config: dict, quant: QuantConfig,
                 files: dict[str, SafetensorsFile]):
        self.path = path
        self.config = config
        self.quant = quant
        self._file_of: dict[str, SafetensorsFile] = {}
        for f in files.values():
            for name in f.tensors:
                self._file_of[name] = f
        self.files = files
        self.modules: dict[str, ModuleEntry] = {}
        self.transposed = set(config["quantization_config"].get("transposed_modules") or [])
        self._validate()

    @classmethod
    def open(cls, path: str | Path) -> KbitModel:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise KbitFormatError(f"{path}: no such folder")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise KbitFormatError(f"{path} has no config.json: not a model folder")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise KbitFormatError(f"{cfg_path} is not valid JSON ({e})") from None
        qc = config.get("quantization_config")
        if not qc or qc.get("quant_method") != "kbit":
            raise KbitFormatError(f"{path} is not a kbit model (config.json has no kbit "
                                  "quantization_config): convert it first with `kbit convert`")
        quant = QuantConfig.from_json(qc)
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError):
                raise KbitFormatError(f"{index} is corrupt") from None
        elif (path / "model.safetensors").exists():
            shard_names = ["model.safetensors"]
        else:
            raise KbitFormatError(f"{path} has no model.safetensors (nor an index): incomplete model")
        files = {}
        for s in shard_names:
            if not (path / s).exists():
                raise KbitFormatError(f"{path}: shard {s} is missing")
            f = SafetensorsFile(path / s)
            meta = f.metadata.get("kbit")
            if meta is None:
                raise KbitFormatError(f"{path / s} has no kbit metadata in its header")
            QuantConfig.from_json(json.loads(meta))  # refuses unknown versions per shard too
            files[s] = f
        return cls(path, config, quant, files)

    def _validate(self) -> None:
        d16 = None
        for name in sorted(self._file_of):
            module, _, suffix = name.rpartition(".")
            if suffix != QWEIGHT:
                continue
            if SHAPE not in self._suffixes(module):
                raise KbitFormatError(f"{self.path}: {module} has no {SHAPE} tensor")
            n, k = (int(v) for v in self._read(f"{module}.{SHAPE}").tolist())
            n_out = self.info(f"{module}.{OUTLIER_IDX}").shape[0] \
                if f"{module}.{OUTLIER_IDX}" in self._file_of else 0
            if n_out:
                d16 = self.info(f"{module}.{OUTLIER_WEIGHT}").dtype \
                    if f"{module}.{OUTLIER_WEIGHT}" in self._file_of else "F16"
            cb_len = self.info(f"{module}.{CODEBOOK}").shape[0] \
                if f"{module}.{CODEBOOK}" in self._file_of else 0
            if not 2 <= cb_len <= 2**self.quant.bits:
                raise KbitFormatError(f"{self.path}: {module}.{CODEBOOK} missing or has {cb_len} "
                                      f"entries (at most {2**self.quant.bits} for {self.quant.bits} bits)")
            layout = LinearLayout(n, k, self.quant, n_outliers=n_out, codebook_len=cb_len)
            for suffix, (dtype, shape) in layout.tensor_specs(d16 or "F16").items():
                full = f"{module}.{suffix}"
                if full not in self._file_of:
                    raise KbitFormatError(f"{self.path}: tensor {full} is missing")
                info = self.info(full)
                if info.shape != tuple(shape) or info.dtype != dtype:
                    raise KbitFormatError(
                        f"{self.path}: {full} is {info.dtype}{list(info.shape)}, expected "
                        f"{dtype}{list(shape)} for a ({n}, {k}) linear at {self.quant.label}")
            self.modules[module] = ModuleEntry(module, n, k, n_out)
        if not self.modules:
            raise KbitFormatError(f"{self.path}: no quantized linears found")

    def _suffixes(self, module: str) -> set[str]:
        return {s for s in QUANT_SUFFIXES if f"{module}.{s}" in self._file_of}

    def info(self, name: str):
        return self._file_of[name].tensors[name]

    def _read(self, name: str) -> torch.Tensor:
        return self._file_of[name].read(name)

    # -- what the runtime uses -------------------------------------------------------------
    @property
    def quantized_modules(self) -> list[str]:
        return list(self.modules)

    @property
    def plain_names(self) -> list[str]:
        return [n for n in sorted(self._file_of)
                if not (n.rpartition(".")[0] in self.modules and n.rpartition(".")[2] in QUANT_SUFFIXES)]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KbitFormatError(f"{self.path}: no tensor {name}")
        return self._read(name)

    def quantized(self, module: str) -> QuantizedWeight:
        e = self.modules[module]
        tensors = {s: self._read(f"{module}.{s}") for s in self._suffixes(module) if s != SHAPE}
        return QuantizedWeight.from_tensors(tensors, self.quant, (e.out_features, e.in_features))

    # -- accounting ---------------------------------------------------------------------------
    def tensor_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._file_of)

    def quantized_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._file_of
                   if n.rpartition(".")[0] in self.modules and n.rpartition(".")[2] in QUANT_SUFFIXES)

    def params_quantized(self) -> int:
        return sum(e.out_features * e.in_features for e in self.modules.values())

    def params_total(self) -> int:
        return self.params_quantized() + sum(math.prod(self.info(n).shape) for n in self.plain_names)

    def file_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())

    def summary(self) -> dict:
        """What `kbit inspect` shows and the model card records: exact figures from the bytes on disk."""
        qc = self.config["quantization_config"]
        pq, pt = self.params_quantized(), self.params_total()
        return {
            "path": str(self.path), "model_type": self.config.get("model_type"),
            "architectures": self.config.get("architectures"), "quantization": qc,
            "label": self.quant.label, "linears_quantized": len(self.modules),
            "modules_not_quantized": qc.get("modules_not_quantized", []),
            "params_total": pt, "params_quantized": pq,
            "bits_per_param_quantized": round(8 * self.quantized_bytes() / max(pq, 1), 6),
            "bits_per_param_model": round(8 * self.tensor_bytes() / max(pt, 1), 6),
            "tensor_bytes": self.tensor_bytes(), "file_bytes": self.file_bytes(), "shards": len(self.files),
            "outlier_columns": sum(e.n_outliers for e in self.modules.values()),
            "modules": [{"name": e.name, "out_features": e.out_features, "in_features": e.in_features,
                         "outliers": e.n_outliers} for e in self.modules.values()],
        }
