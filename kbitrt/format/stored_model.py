"""What every reader of a kbit model folder shares, whatever its packing: the folder's shards
(validated against the index, their headers and each other), one name -> shard index, lookups, the
byte accounting from the bytes on disk, and the checks both packings make (one implementation, so
bitplane-v1 is held to everything bitslice-v1 is): each linear's recorded shape, its tensors'
dtypes and shapes (unknown ones named), codebook values, outlier indices, the dtype of every plain
tensor, the module lists of the quantization_config, and finite non-negative block scales (checked
where they are read, once per linear, vectorised). reader.KbitModel (bitslice-v1) and
bitplane.BitplaneModel (bitplane-v1) build on it and add what their packing checks and returns."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from kbitrt.format.config import (ABSMAX, ABSMAX_OFFSET, ABSMAX_SCALE, OUTLIER_IDX, QUANT_SUFFIXES,
                                  QWEIGHT, SHAPE, KbitFormatError)
from kbitrt.format.experts import expert_summary
from kbitrt.format.safetensors_io import SafetensorsFile

SHARD_NAME = re.compile(r"^[\w.\-]+\.safetensors$")
# config.json `dtype` -> dtype of every floating tensor kept unquantized (kbit convert writes 16 bit;
# a model loaded in fp32 through transformers and saved again keeps fp32)
FLOAT16 = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
PLAIN_INT_DTYPES = ("I64", "I32", "U8", "BOOL")  # integer buffers a model may carry (ids, masks)


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


def verify_requested(verify: bool | None) -> bool:
    """`verify`, or when None the environment's request (KBIT_VERIFY=1: check at every load)."""
    return bool(verify) if verify is not None else os.environ.get("KBIT_VERIFY", "0") == "1"


def dtype16_of(path: Path, config: dict) -> str:
    """The safetensors dtype of everything kept in 16 bit, from config.json's `dtype`."""
    declared = config.get("dtype", config.get("torch_dtype"))
    if not isinstance(declared, str) or declared not in FLOAT16:
        raise format_error(path / "config.json", f"dtype is {declared!r}: a kbit model says "
                           "float16, bfloat16 or float32 for what it keeps unquantized")
    return FLOAT16[declared]


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
        qc = config["quantization_config"]
        for key in ("transposed_modules", "modules_not_quantized"):
            names = qc.get(key)
            if names is not None and not (isinstance(names, list)
                                          and all(isinstance(m, str) for m in names)):
                raise format_error(path / "config.json", f"quantization_config.{key} is {names!r}: "
                                   "it must be a list of module names")
        self.transposed = set(qc.get("transposed_modules") or [])
        self.dtype16 = dtype16_of(path, config)

    # -- checks shared by both packings ---------------------------------------------------------
    def quantized_groups(self) -> dict[str, set[str]]:
        """module -> the quantized-linear suffixes it has; a part without its qweight is refused."""
        by_module: dict[str, set[str]] = {}
        for name in self._file_of:
            module, _, suffix = name.rpartition(".")
            if suffix in QUANT_SUFFIXES:
                by_module.setdefault(module, set()).add(suffix)
        for module in sorted(by_module):
            if QWEIGHT not in by_module[module]:
                extra = sorted(by_module[module])[0]
                raise format_error(self.file_path(f"{module}.{extra}"), f"tensor {module}.{extra} "
                                   f"belongs to no quantized linear ({module}.{QWEIGHT} is missing)")
        if not by_module:
            raise KbitFormatError(f"{self.path}: no quantized linears found: convert the model again")
        return dict(sorted(by_module.items()))

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(N, K) from `<module>.weight_shape`, an I64[2] of positive values."""
        name = f"{module}.{SHAPE}"
        if name not in self._file_of:
            raise format_error(self.file_path(f"{module}.{QWEIGHT}"), f"{module} has no {SHAPE} tensor")
        info = self.info(name)
        if info.dtype != "I64" or info.shape != (2,):
            raise format_error(self.file_path(name), f"{name} is {info.dtype}{list(info.shape)}, "
                                                     "expected I64[2]")
        n, k = (int(v) for v in self.read(name).tolist())
        if not (0 < n < 2**31 and 0 < k < 2**31):
            raise format_error(self.file_path(name), f"{name} holds ({n}, {k}), not a linear's shape")
        return n, k

    def outlier_count(self, module: str, k: int) -> int:
        """Columns kept in 16 bit: the length of a 1-D `outlier_idx` below K (0 without one)."""
        name = f"{module}.{OUTLIER_IDX}"
        if name not in self._file_of:
            return 0
        shape = self.info(name).shape
        if len(shape) != 1 or not 0 < shape[0] < k:
            raise format_error(self.file_path(name), f"{name} has shape {list(shape)}: expected 1 to "
                                                     f"{k - 1} column indices")
        return shape[0]

    def check_specs(self, module: str, has: set[str], specs: dict, what: str) -> None:
        """Every tensor of `module` is one of `specs` (suffix -> (dtype, shape)), none missing."""
        for suffix in sorted(has - set(specs)):
            raise format_error(self.file_path(f"{module}.{suffix}"), f"tensor {module}.{suffix} "
                               f"does not belong to {what}")
        for suffix, (dtype, shape) in specs.items():
            full = f"{module}.{suffix}"
            if full not in self._file_of:
                raise format_error(self.path, f"tensor {full} is missing")
            info = self.info(full)
            if info.shape != tuple(shape) or info.dtype != dtype:
                raise format_error(self.file_path(full), f"{full} is {info.dtype}{list(info.shape)}, "
                                   f"expected {dtype}{list(shape)} for {what}")

    def check_codebook(self, name: str, values: list[float], distinct: bool = True) -> None:
        """Sorted (strictly when `distinct`), finite, within [-1, 1]: at most 256 plain floats."""
        ordered = all(hi > lo if distinct else hi >= lo for lo, hi in zip(values, values[1:]))
        if not ordered or not all(math.isfinite(e) and abs(e) <= 1 for e in values):
            raise format_error(self.file_path(name), f"{name} is not a sorted codebook of "
                               f"{'distinct ' if distinct else ''}finite values in [-1, 1]")

    def check_outlier_idx(self, module: str, k: int) -> None:
        name = f"{module}.{OUTLIER_IDX}"
        idx = self.read(name)
        if int(idx.min()) < 0 or int(idx.max()) >= k or bool((idx[1:] <= idx[:-1]).any()):
            raise format_error(self.file_path(name), f"{name} must be strictly increasing column "
                                                     f"indices in [0, {k})")

    def check_plain_dtypes(self) -> None:
        """Floating plain tensors are in config.json's dtype; integer ones of a kind models carry."""
        for name in self.plain_names:
            dtype = self.info(name).dtype
            if dtype in ("F16", "BF16", "F32", "F64"):
                if dtype != self.dtype16:
                    raise format_error(self.file_path(name), f"tensor {name} is {dtype}, but "
                                       f"config.json says the model's 16-bit dtype is {self.dtype16}")
            elif dtype not in PLAIN_INT_DTYPES:
                raise format_error(self.file_path(name), f"tensor {name} has dtype {dtype}, which no "
                                                         "kbit model stores")

    def check_module_lists(self) -> None:
        """transposed_modules names quantized linears only; modules_not_quantized none of them."""
        qc = self.config["quantization_config"]
        for key, names, bad in (("transposed_modules", self.transposed,
                                 lambda m: m not in self.modules),
                                ("modules_not_quantized", qc.get("modules_not_quantized") or [],
                                 lambda m: m in self.modules)):
            wrong = sorted(m for m in names if bad(m))
            if wrong:
                raise format_error(self.path / "config.json", f"quantization_config.{key} names "
                                   f"{wrong[0]}, which is {'not ' if key == 'transposed_modules' else ''}"
                                   "a quantized linear of this folder")

    def scales(self, module: str) -> dict[str, torch.Tensor]:
        """The block scales of `module` (absmax; with dq8 its scale and offset too), read and
        checked: finite, and the absmax of fp16/fp32 scales non-negative (one vectorised pass)."""
        out = {s: self.read(f"{module}.{s}") for s in (ABSMAX, ABSMAX_SCALE, ABSMAX_OFFSET)
               if f"{module}.{s}" in self._file_of}
        for suffix, t in out.items():
            if t.dtype == torch.uint8:
                continue  # dq8 codes: every byte is a valid code
            bad = ~torch.isfinite(t)
            if suffix != ABSMAX_OFFSET:
                bad |= t < 0
            if bool(bad.any()):
                name = f"{module}.{suffix}"
                raise format_error(self.file_path(name), f"{name} holds {int(bad.sum())} block "
                                   "scale(s) that are NaN, infinite or negative")
        return out

    def verify(self) -> dict:
        """Read every byte once: each tensor against its CRC-32 (when the shards carry them) and
        every linear's block scales. Returns what was verified; a failure is one KbitFormatError."""
        verified, unsummed = 0, []
        for name, f in self.files.items():
            n = f.verify_checksums()
            if n is None:
                unsummed.append(name)
            else:
                verified += n
        for module in self.modules:
            self.scales(module)
        return {"tensors_checksummed": verified, "shards_without_checksums": unsummed,
                "linears_scales_checked": len(self.modules)}

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
