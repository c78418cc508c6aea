"""What a model folder holds, counted from the bytes on disk: shared by the readers of every packing
(reader.KbitModel, bitplane.BitplaneModel), which provide `_file_of`, `modules`, `plain_names`,
`files` and `info`."""

from __future__ import annotations

import math

from kbitrt.format.config import QUANT_SUFFIXES


class StoredBytes:
    """Byte and parameter accounting over a reader's tensors (bits/param are exact from these)."""

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
