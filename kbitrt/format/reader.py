"""The one reader of kbit folders: `kbit inspect`, `kbit dequantize` and the runtime all use it.

Opening validates everything that can be checked without reading weights: the quantization_config
(known format_version and packing), every shard's header and size (truncation), the format
metadata in each header, and, for every quantized linear, that its tensors exist with the dtypes
and shapes its recorded (N, K) and the settings imply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbitrt.format import dtypes
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.model_check import check_against_model
from kbitrt.format.safetensors_io import SafetensorsFile
from kbitrt.format.stored_model import (StoredModel, format_error, open_shards, read_json,
                                        verify_requested)
from kbitrt.format.config import (CODEBOOK, QWEIGHT, SHAPE, KbitFormatError, LinearLayout,
                                  QuantConfig)


@dataclass
class ModuleEntry:
    name: str
    out_features: int
    in_features: int
    n_outliers: int


_fail = format_error  # every check below raises it: where, what, what to do


class KbitModel(StoredModel):
    def __init__(self, path: Path, config: dict, quant: QuantConfig,
                 files: dict[str, SafetensorsFile], check_model: bool = True):
        super().__init__(path, config, quant, files)
        with torch.device("cpu"):  # callers may open a folder inside a meta-device context
            self._validate()
            if check_model:
                check_against_model(self)

    @classmethod
    def open(cls, path: str | Path, check_model: bool = True, verify: bool | None = None) -> KbitModel:
        """Open and validate a kbit folder; every violation is one KbitFormatError naming the file,
        the tensor and what to do (docs/format.md lists the checks). `check_model=False` leaves out
        the check against the architecture transformers builds (model_check.py: it imports the
        model's code), for callers that check every name and shape themselves (the native decoder).
        `verify` (default: KBIT_VERIFY=1 in the environment) also reads every byte once: each
        tensor against its CRC-32 and every linear's block scales (StoredModel.verify)."""
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
            km = BitplaneModel.open(path, config, check_model)
        else:
            try:
                quant = QuantConfig.from_json(qc)
            except KbitFormatError as e:
                raise KbitFormatError(f"{cfg_path}: {e}") from None
            km = cls(path, config, quant, open_shards(path, quant, QuantConfig.from_json), check_model)
        if verify_requested(verify):
            km.verify()
        return km

    def _validate(self) -> None:
        for module, has in self.quantized_groups().items():
            self.modules[module] = self._validate_linear(module, has)
        self.check_plain_dtypes()
        self.check_module_lists()

    def _validate_linear(self, module: str, has: set[str]) -> ModuleEntry:
        q = self.quant.for_module(module)  # the head and embedding may hold their own width
        n, k = self.linear_shape(module)
        n_out = self.outlier_count(module, k)
        cb_len = self.info(f"{module}.{CODEBOOK}").shape[0] \
            if CODEBOOK in has and len(self.info(f"{module}.{CODEBOOK}").shape) == 1 else 0
        fixed = dtypes.codebook_len(q)
        if not (2 <= cb_len <= 2**q.bits) or (q.dtype != "quantile" and cb_len != fixed):
            raise _fail(self.file_path(f"{module}.{QWEIGHT}"), f"{module}.{CODEBOOK} missing or has "
                        f"{cb_len} entries ({fixed if q.dtype != 'quantile' else f'at most {2**q.bits}'} "
                        f"for {q.dtype}{q.bits})")
        layout = LinearLayout(n, k, q, n_outliers=n_out, codebook_len=cb_len)
        self.check_specs(module, has, layout.tensor_specs(self.dtype16),
                         f"a ({n}, {k}) {q.label} linear{' without outliers' if not n_out else ''}")
        # at most 256 entries: plain Python, no tensor ops for a load to page in
        self.check_codebook(f"{module}.{CODEBOOK}", self.read(f"{module}.{CODEBOOK}").tolist())
        if n_out:
            self.check_outlier_idx(module, k)
        return ModuleEntry(module, n, k, n_out)

    def quantized(self, module: str) -> QuantizedWeight:
        e = self.modules[module]
        tensors = {s: self.read(f"{module}.{s}") for s in self.suffixes(module) if s != SHAPE}
        tensors.update(self.scales(module))  # checked: finite, non-negative
        return QuantizedWeight.from_tensors(tensors, self.quant.for_module(module),
                                            (e.out_features, e.in_features))
