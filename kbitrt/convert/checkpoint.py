"""Tensor-by-tensor access to a plain HF checkpoint (safetensors via pread, .bin via mmap)."""

from __future__ import annotations

import pickle
import zipfile

import torch

from kbitrt.format.safetensors_io import SAFETENSORS_TORCH_DTYPES, SafetensorsFile
from kbitrt.convert.source import Checkpoint
from kbitrt.errors import KbitFormatError


class CheckpointTensors:
    """name -> (dtype, shape) without reading data; `read` loads one tensor or a row range."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._where: dict[str, object] = {}
        self._shape: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in ckpt.files:
            if ckpt.kind == "safetensors":
                f = SafetensorsFile(path)
                for name, info in f.tensors.items():
                    self._add(name, f, info.shape, SAFETENSORS_TORCH_DTYPES[info.dtype])
            else:
                state = _load_bin(path)
                for name, t in state.items():
                    if isinstance(t, torch.Tensor):
                        self._add(name, state, tuple(t.shape), t.dtype)

    def _add(self, name, where, shape, dtype) -> None:
        if name in self._where:
            raise KbitFormatError(f"{self.ckpt.folder}: tensor {name} appears in two shards")
        self._where[name] = where
        self._shape[name] = (tuple(shape), dtype)

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._shape[name][1]

    def nbytes(self, name: str) -> int:
        shape, dtype = self._shape[name]
        n = 1
        for d in shape:
            n *= d
        return n * torch.empty(0, dtype=dtype).element_size()

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        where = self._where[name]
        if isinstance(where, SafetensorsFile):
            return where.read(name, rows)
        t = where[name]
        return (t if rows is None else t[rows[0]: rows[1]]).clone()


def _load_bin(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
        raise KbitFormatError(f"{path}: cannot read this .bin checkpoint safely "
                              f"({str(e).splitlines()[0][:120]})") from None

