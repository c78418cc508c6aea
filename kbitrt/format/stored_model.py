"""What every reader of a kbit model folder shares, whatever its packing: the folder's shards
(validated against the index, their headers and each other), one name -> shard index, lookups, and
the byte accounting from the bytes on disk. reader.KbitModel (bitslice-v1) and
bitplane.BitplaneModel (bitplane-v1) build on it and add what their packing checks and returns."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from kbitrt.format.config import QUANT_SUFFIXES, KbitFormatError
from kbitrt.format.experts import expert_summary
from kbitrt.format.safetensors_io import SafetensorsFile

SHARD_NAME = re.compile(r"^[\w.\-]+\.safetensors$")


def format_error(where, what: str, todo: str = "convert the model again") -> KbitFormatError:
    """The one-line error of a folder that fails validation: where, what is wrong, what to do."""
    return KbitFormatError(f"{where}: {what}: {todo}")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise KbitFormatError(f"{path}: permission denied: make the file readable") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise format_error(path, f"is not valid UTF-8 JSON ({str(e).splitlines()[0][:80]})") from None


def open_shards(path: Path, quant, parse: Callable[[dict], object]) -> dict[str, SafetensorsFile]:
    """The folder's shards by file name, each checked: present, its header readable, its kbit
    metadata (read by `parse`, a config class's from_json) equal to `quant` from config.json, its
    tensors in a writer's order, and, when sharded, in the shard the index names."""
    index = path / "model.safetensors.index.json"
    weight_map = None
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) and SHARD_NAME.match(v)
                for k, v in weight_map.items()):
            raise format_error(index, "has no valid weight_map (tensor name -> shard file name)")
        shard_names = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        shard_names = ["model.safetensors"]
    else:
        raise KbitFormatError(f"{path} has no model.safetensors (nor an index): incomplete model")
    files = {}
    for s in shard_names:
        if not (path / s).is_file():
            raise format_error(path, f"shard {s} is missing", "download or convert the model again")
        f = SafetensorsFile(path / s)
        meta = f.metadata.get("kbit")
        if meta is None:
            raise format_error(path / s, "has no kbit metadata in its header")
        try:
            shard_quant = parse(json.loads(meta))
        except (json.JSONDecodeError, KbitFormatError) as e:
            raise format_error(path / s, f"has unreadable kbit metadata ({str(e)[:100]})") from None
        if shard_quant != quant:
            raise format_error(path / s, f"header says {shard_quant.label} but config.json says "
                                         f"{quant.label}", "the folder mixes two conversions; convert again")
        check_order(f)
        if weight_map is not None:
            for name in f.tensors:
                if weight_map.get(name) != s:
                    raise format_error(index, f"tensor {name} is in {s} but the index says "
                                              f"{weight_map.get(name)}")
        files[s] = f
    if weight_map is not None:
        absent = [n for n, s in weight_map.items() if n not in files[s].tensors]
        if absent:
            raise format_error(index, f"lists {len(absent)} tensors its shards lack (e.g. {absent[0]})")
    return files


def check_order(f: SafetensorsFile) -> None:
    """kbit shards store tensors in name order (kbit convert), or grouped by dtype and in name order
    within each group (the safetensors library, e.g. transformers' save_pretrained). Two tensors of
    one size whose offsets were swapped break both orders and are refused."""
    by_offset = sorted(f.tensors, key=lambda n: f.tensors[n].begin)
    if by_offset == sorted(f.tensors):
        return
    groups: list[str] = []
    for name in by_offset:
        dtype = f.tensors[name].dtype
        if not groups or groups[-1] != dtype:
            groups.append(dtype)
    in_group_order = all(
        [n for n in by_offset if f.tensors[n].dtype == d] == sorted(n for n in f.tensors
                                                                   if f.tensors[n].dtype == d)
        for d in set(groups))
    if len(groups) != len(set(groups)) or not in_group_order:
        raise format_error(f.path, "stores its tensors out of order (data_offsets point at another "
                                   "tensor's bytes)", "download or convert the model again")


class StoredModel:
    """A validated folder's tensors by name. Subclasses fill `modules` (quantized linear name ->
    an entry with out_features, in_features, n_outliers) while validating."""

    def __init__(self, path: Path, config: dict, quant, files: dict[str, SafetensorsFile]):
        self.path, self.config, self.quant, self.files = path, config, quant, files
        self._file_of: dict[str, SafetensorsFile] = {}
        for f in files.values():
            for name in f.tensors:
                if name in self._file_of:
                    raise format_error(f.path, f"tensor {name} is also in {self._file_of[name].path.name}")
                self._file_of[name] = f
        self.modules: dict = {}
        self.transposed = set(config["quantization_config"].get("transposed_modules") or [])

    def file_path(self, name: str) -> Path:
        f = self._file_of.get(name)
        return f.path if f is not None else self.path

    def suffixes(self, module: str) -> set[str]:
        """The quantized-linear tensors `module` has (QUANT_SUFFIXES present in the folder)."""
        return {s for s in QUANT_SUFFIXES if f"{module}.{s}" in self._file_of}

    def info(self, name: str):
        return self._file_of[name].tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self._file_of[name].read(name, rows)

    @property
    def quantized_modules(self) -> list[str]:
        return list(self.modules)

    def _is_quantized_part(self, name: str) -> bool:
        module, _, suffix = name.rpartition(".")
        return module in self.modules and suffix in QUANT_SUFFIXES

    @property
    def plain_names(self) -> list[str]:
        return [n for n in sorted(self._file_of) if not self._is_quantized_part(n)]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KbitFormatError(f"{self.path}: no tensor {name}")
        return self.read(name)

    # -- accounting: exact bits/param from the bytes on disk -------------------------------------
    def tensor_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._file_of)

    def quantized_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._file_of if self._is_quantized_part(n))

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
            "experts": expert_summary({m: (e.out_features, e.in_features) for m, e in self.modules.items()}),
            "modules": [{"name": e.name, "out_features": e.out_features, "in_features": e.in_features,
                         "outliers": e.n_outliers} for e in self.modules.values()],
        }
