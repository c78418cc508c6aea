"""Streaming safetensors: read row ranges with pread, write planned shards piece by piece.

The safetensors library maps whole files; touched pages then count as resident memory of the
converter. Reading with pread keeps the resident set at the size of the chunk being converted, and
planning every output tensor's offset up front lets each piece be written once, where it belongs.
Headers are written with sorted keys, so the same tensors give byte-identical files.

Every shard kbitrt writes carries a CRC-32 (zlib) of each tensor's bytes in its header metadata,
`kbit_crc32`: a JSON object tensor name -> 8 lowercase hex digits, computed from the bytes on disk
once the shard is complete (the header is rewritten in place; the entry's length is fixed when
the shard is planned). `verify_checksums` recomputes them: swapped planes, flipped bytes and
relabelled offsets that pass every structural check are caught (`kbit inspect --verify`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kbitrt.errors import KbitFormatError

# safetensors dtype name -> torch dtype; DTYPE_NAMES: torch dtype -> safetensors dtype name
SAFETENSORS_TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_TORCH_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
CHECKSUM_KEY = "kbit_crc32"  # header metadata: tensor name -> crc32 of its bytes, 8 hex digits
_CRC = re.compile(r"^[0-9a-f]{8}$")
_CHUNK = 16 * 2**20


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the name {dup!r} appears twice")
    return dict(pairs)


def itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=SAFETENSORS_TORCH_DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """Header of one .safetensors file plus pread access to its tensors (no mmap).

    The header is validated before any tensor byte is used (docs/format.md, "What the reader
    checks"): its length and JSON, every entry's dtype, shape and offsets, and that the tensors
    tile the data section exactly (in bounds, no overlap, no gap, no trailing bytes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise self._error("is truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", raw)
                if n < 2 or n > MAX_HEADER or 8 + n > size:
                    raise self._error(f"has a header length of {n} bytes in a {size}-byte file: "
                                      "truncated or not a safetensors file")
                blob = f.read(n)
        except PermissionError:
            raise KbitFormatError(f"{self.path}: permission denied: make the file readable") from None
        try:
            header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise self._error(f"has a corrupt header ({str(e).splitlines()[0][:80]})") from None
        if not isinstance(header, dict):
            raise self._error("has a header that is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in meta.items()):
            raise self._error("has __metadata__ that is not a str -> str mapping")
        self.metadata: dict[str, str] = meta
        start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            self.tensors[name] = self._entry(name, h, start)
        spans = sorted(((t.begin, t.end, name) for name, t in self.tensors.items()))
        pos = start
        for b, e, name in spans:
            if b != pos:
                what = "overlaps the tensor before it" if b < pos else f"leaves a gap of {b - pos} bytes before it"
                raise self._error(f"tensor {name} {what} (data_offsets do not tile the data)")
            pos = e
        if pos > size:
            name = spans[-1][2]
            raise self._error(f"is truncated ({size} bytes; tensor {name} ends at {pos})")
        if pos != size:
            raise self._error(f"has {size - pos} trailing bytes after the last tensor")

        self.checksums = self._checksums()

    def _error(self, what: str) -> KbitFormatError:
        return KbitFormatError(f"{self.path} {what}: download or convert it again")

    def _checksums(self) -> dict[str, str] | None:
        """The header's per-tensor CRC-32s (None when it has none), checked for form (a map of
        names to 8 hex digits); that they name exactly the file's tensors is checked by
        verify_checksums, so a tensor missing from a re-saved file is reported as missing."""
        text = self.metadata.get(CHECKSUM_KEY)
        if text is None:
            return None
        try:
            sums = json.loads(text)
        except ValueError:
            sums = None
        if not isinstance(sums, dict) or not all(isinstance(v, str) and _CRC.match(v)
                                                 for v in sums.values()):
            raise self._error(f"has a malformed {CHECKSUM_KEY} entry (tensor name -> 8-hex-digit "
                              "CRC-32)")
        return sums

    def crc32(self, name: str) -> str:
        """CRC-32 of the tensor's bytes on disk, read in chunks."""
        info = self.tensors[name]
        crc, pos = 0, info.begin
        with open(self.path, "rb", buffering=0) as f:
            while pos < info.end:
                chunk = os.pread(f.fileno(), min(_CHUNK, info.end - pos), pos)
                if not chunk:
                    raise KbitFormatError(f"{self.path}: truncated while reading {name}")
                crc = zlib.crc32(chunk, crc)
                pos += len(chunk)
        return f"{crc:08x}"

    def verify_checksums(self) -> int | None:
        """Recompute every tensor's CRC-32 against the header's; the number verified (None when
        the file has no checksums). A mismatch is one KbitFormatError naming the tensor."""
        if self.checksums is None:
            return None
        odd = sorted(set(self.checksums) ^ set(self.tensors))
        if odd:
            raise self._error(f"has {CHECKSUM_KEY} entries that do not match its tensors (e.g. "
                              f"{odd[0]})")
        for name in sorted(self.tensors, key=lambda n: self.tensors[n].begin):
            if self.crc32(name) != self.checksums[name]:
                raise self._error(f"tensor {name} does not match its CRC-32 (the bytes changed "
                                  "after it was written)")
        return len(self.tensors)

    def _entry(self, name: str, h, start: int) -> TensorInfo:
        if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
            raise self._error(f"has a malformed entry for tensor {name} (needs exactly dtype, "
                              "shape, data_offsets)")
        dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_TORCH_DTYPES:
            raise self._error(f"gives tensor {name} the unsupported dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._error(f"gives tensor {name} an invalid shape {str(shape)[:40]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise self._error(f"gives tensor {name} invalid data_offsets {str(offsets)[:40]}")
        info = TensorInfo(dtype, tuple(shape), start + offsets[0], start + offsets[1])
        if info.nbytes != math.prod(info.shape) * itemsize(dtype):
            raise self._error(f"gives tensor {name} {info.nbytes} bytes for a {dtype}{list(shape)}")
        return info

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or rows [r0, r1) of its first dimension, read with one pread."""
        info = self.tensors[name]
        shape = list(info.shape)
        begin, nbytes = info.begin, info.nbytes
        if rows is not None:
            r0, r1 = rows
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            begin += r0 * row_bytes
            nbytes = (r1 - r0) * row_bytes
            shape[0] = r1 - r0
        buf = bytearray(nbytes)
        with open(self.path, "rb", buffering=0) as f:
            view, done = memoryview(buf), 0
            while done < nbytes:
                got = os.preadv(f.fileno(), [view[done:]], begin + done)
                if got == 0:
                    raise KbitFormatError(f"{self.path}: truncated while reading {name}")
                done += got
        if nbytes == 0:
            return torch.empty(shape, dtype=SAFETENSORS_TORCH_DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=SAFETENSORS_TORCH_DTYPES[info.dtype]).view(shape)


@dataclass
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


class ShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are known in advance."""

    def __init__(self, path: Path, planned: list[PlannedTensor], metadata: dict[str, str],
                 checksums: bool = True):
        self.path = path
        self.metadata = dict(metadata)
        offset = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        self.planned = sorted(planned, key=lambda t: t.name)
        for t in self.planned:
            self.offsets[t.name] = (offset, offset + t.nbytes)
            offset += t.nbytes
        self.checksums = checksums
        blob = self._header({t.name: "0" * 8 for t in self.planned})  # the CRCs come at close
        self.data_start = 8 + len(blob)
        self.total = self.data_start + offset
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(struct.pack("<Q", len(blob)) + blob, 0)
        self._rfd: int | None = None
        self.written = 0

    def _header(self, crcs: dict[str, str]) -> bytes:
        meta = dict(self.metadata)
        if self.checksums:
            meta[CHECKSUM_KEY] = json.dumps(crcs, separators=(",", ":"), sort_keys=True)
        header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
        for t in self.planned:
            b, e = self.offsets[t.name]
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [b, e]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        return blob + b" " * (-len(blob) % 8)  # data starts 8-byte aligned

    def _pwrite(self, data, pos: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n

    def write(self, name: str, tensor: torch.Tensor, byte_offset: int = 0) -> None:
        """Write `tensor` (contiguous) at `byte_offset` bytes into the planned tensor `name`."""
        begin, end = self.offsets[name]
        t = tensor.detach().contiguous()
        if DTYPE_NAMES.get(t.dtype) is None:
            raise TypeError(f"cannot store {t.dtype}")
        check_finite_written(name, t)
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        if begin + byte_offset + len(data) > end:
            raise ValueError(f"{name}: write past its planned end")
        self._pwrite(data, self.data_start + begin + byte_offset)
        self.written += len(data)

    def close(self) -> None:
        expected = self.total - self.data_start
        try:
            if self.written != expected:
                raise RuntimeError(f"{self.path}: wrote {self.written} of {expected} bytes")
            if self.checksums:  # from the bytes on disk, so what is verified is what was written
                crcs = {}
                for t in self.planned:
                    b, e = self.offsets[t.name]
                    crc, pos = 0, self.data_start + b
                    while pos < self.data_start + e:
                        chunk = os.pread(self._fd_read(), min(_CHUNK, self.data_start + e - pos), pos)
                        if not chunk:
                            raise RuntimeError(f"{self.path}: short read at {pos}")
                        crc = zlib.crc32(chunk, crc)
                        pos += len(chunk)
                    crcs[t.name] = f"{crc:08x}"
                blob = self._header(crcs)
                assert 8 + len(blob) == self.data_start  # same length: only hex digits changed
                self._pwrite(blob, 8)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            if self._rfd is not None:
                os.close(self._rfd)

    def _fd_read(self) -> int:
        if self._rfd is None:
            self._rfd = os.open(self.path, os.O_RDONLY)
        return self._rfd


def check_finite_written(name: str, t: torch.Tensor) -> None:
    """Every float written must be finite in the dtype it is written in (an fp32 value beyond the
    fp16 range becomes inf when cast): refuse, naming the tensor, rather than write NaN/Inf."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)]
        what = "NaN" if bool(torch.isnan(bad).any()) else "Inf"
        hint = (f" (beyond the {DTYPE_NAMES[t.dtype]} range {torch.finfo(t.dtype).max:.4g}: write a "
                "wider dtype: convert --dtype16 bf16 or --absmax-dtype fp32, dequantize --dtype "
                "bf16 or fp32)") if t.dtype == torch.float16 else ""
        raise KbitFormatError(f"{name}: {bad.numel()} {what} value(s) would be written as "
                              f"{DTYPE_NAMES[t.dtype]}{hint}; nothing was written")


def plan_shards(planned: list[PlannedTensor], max_bytes: int) -> list[tuple[str, list[PlannedTensor]]]:
    """Tensors (in order) grouped into shards of at most `max_bytes`, with their HF file names."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in planned:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, shards))


def save_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Small, whole-dict writer (tests, dequantized output) with the same byte-exact header."""
    plan = [PlannedTensor(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    w = ShardWriter(path, plan, metadata)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
