"""What a kbit model is: the quantization settings, their validation, and the tensor names.

Everything a reader needs is in `config.json["quantization_config"]` and repeated in every
safetensors header; nothing is inferred from file names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from kbitrt.errors import KbitFormatError
from kbitrt.format import dtypes

FORMAT_VERSION = 1
KNOWN_FORMAT_VERSIONS = (1,)
QUANT_METHOD = "kbit"
# Bit-slice packing, see docs/format.md.  A second layout (bit planes) gets its own name.
PACKING = "bitslice-v1"
KNOWN_PACKINGS = (PACKING,)

SCALES = ("absmax", "mse")  # how block scales are chosen (kbitrt/format/scales.py)
# what weights each input column's error in the fitted choices (mse scales, lloyd): nothing, the
# gain^2 of the norm the linear reads (zero-shot, converter), each input's second moment while the
# model reads uniformly random tokens (no data), or on calibration text (the diagonal of the
# calibration Hessian: one-shot, with rtn or gptq)
IMPORTANCE = ("none", "norm", "random", "hessian")
METHODS = ("rtn", "gptq")  # round-to-nearest, or GPTQ with calibration data (convert/calibrate.py)
ABSMAX_DTYPES = ("fp16", "fp32", "dq8")
MIN_BITS, MAX_BITS = 3, 8
MIN_BLOCK, MAX_BLOCK = 32, 4096
DOUBLE_QUANT_BLOCK = 256  # blocks of absmax values quantized together by `dq8`

# Suffixes of the tensors that replace `<module>.weight` of a quantized linear.
QWEIGHT = "qweight"  # uint8 (N, row_bytes): packed codes, docs/format.md
ABSMAX = "absmax"  # fp16/fp32 (N, n_blocks); with dq8: uint8 codes
ABSMAX_SCALE = "absmax_scale"  # dq8 only: fp32 (ceil(N*n_blocks/256),)
ABSMAX_OFFSET = "absmax_offset"  # dq8 only: fp32 (1,)
CODEBOOK = "codebook"  # fp32 (<= 2^k,), sorted
SHAPE = "weight_shape"  # int64 (2,): (out_features N, in_features K) of the linear
OUTLIER_IDX = "outlier_idx"  # int64 (n_out,): input columns kept in 16 bit
OUTLIER_WEIGHT = "outlier_weight"  # 16-bit (N, n_out)
QUANT_SUFFIXES = (QWEIGHT, ABSMAX, ABSMAX_SCALE, ABSMAX_OFFSET, CODEBOOK, SHAPE, OUTLIER_IDX,
                  OUTLIER_WEIGHT)


@dataclass(frozen=True)
class OutlierSpec:
    """Proxy quantization: which input columns stay in 16 bit.

    `zscore:4`: columns whose weight std has a z-score above 4 (over the columns of that linear).
    `top:2%`: the 2% of columns with the largest weight std.
    """

    method: str  # "zscore" | "top"
    value: float

    @classmethod
    def parse(cls, text: str | None) -> OutlierSpec | None:
        if text is None or text.strip().lower() in ("", "none", "off"):
            return None
        m = re.fullmatch(r"\s*(zscore|top):\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(%?)\s*", text)
        if not m:
            raise KbitFormatError(
                f"--outliers {text!r} not understood: use 'zscore:4' or 'top:2%' (or 'none')")
        method, number, pct = m.group(1), float(m.group(2)), m.group(3)
        if method == "top":
            if not pct:
                raise KbitFormatError(f"--outliers {text!r}: give top as a percentage, e.g. 'top:2%'")
            if not 0 < number < 50:
                raise KbitFormatError(f"--outliers {text!r}: the percentage must be in (0, 50)")
            number /= 100.0
        elif not number > 0:
            raise KbitFormatError(f"--outliers {text!r}: the z-score threshold must be > 0")
        return cls(method, number)

    def __str__(self) -> str:
        return f"top:{self.value * 100:g}%" if self.method == "top" else f"zscore:{self.value:g}"


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    block_size: int = 64
    dtype: str = "nf"
    exponent_bits: int | None = None  # fp only; None = ceil(bits/2)
    absmax_dtype: str = "fp16"
    outliers: OutlierSpec | None = None
    quantize_head: bool = False
    scales: str = "absmax"
    method: str = "rtn"
    importance: str = "none"
    # the output head's and the input embedding's widths (None: kept in 16 bits, the library's
    # explicit default; `kbit convert` passes HEAD_BITS_DEFAULT; a head_bits implies
    # quantize_head); module_bits: which stored module holds which width, filled by the
    # converter, read by the reader (config.json's quantization_config.module_bits)
    head_bits: int | None = None
    embedding_bits: int | None = None
    module_bits: tuple[tuple[str, int], ...] = ()
    # their data type (None: the model's `dtype`), and module_dtypes: which stored module holds
    # which type where it differs from `dtype` (filled by the converter like module_bits)
    head_dtype: str | None = None
    module_dtypes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise KbitFormatError(f"--bits {self.bits} is not supported: use {MIN_BITS}..{MAX_BITS}")
        for flag, b in (("--head-bits", self.head_bits), ("--embedding-bits", self.embedding_bits),
                        *(("module_bits", b) for _, b in self.module_bits)):
            if b is not None and (_is_bool(b) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS):
                raise KbitFormatError(f"{flag} {b!r} is not supported: use {MIN_BITS}..{MAX_BITS}, "
                                      "or 16 to keep it in 16 bits")
        b = self.block_size
        if not (MIN_BLOCK <= b <= MAX_BLOCK and b & (b - 1) == 0):
            raise KbitFormatError(
                f"--block {b} is not supported: use a power of two in {MIN_BLOCK}..{MAX_BLOCK}")
        data_type = dtypes.get(self.dtype)  # an unknown name raises
        if self.absmax_dtype not in ABSMAX_DTYPES:
            raise KbitFormatError(
                f"--absmax-dtype {self.absmax_dtype!r} is unknown: use one of {', '.join(ABSMAX_DTYPES)}")
        if self.scales not in SCALES:
            raise KbitFormatError(f"--scales {self.scales!r} is unknown: use one of {', '.join(SCALES)}")
        if self.method not in METHODS:
            raise KbitFormatError(f"--method {self.method!r} is unknown: use one of {', '.join(METHODS)}")
        if self.importance not in IMPORTANCE:
            raise KbitFormatError(
                f"--importance {self.importance!r} is unknown: use one of {', '.join(IMPORTANCE)}")
        if self.importance != "none" and self.scales == "absmax" and not data_type.whole_rows:
            raise KbitFormatError(f"--importance {self.importance} changes only fitted choices: "
                                  "use it with --scales mse or --dtype lloyd")
        if self.importance in ("norm", "random") and self.method == "gptq":
            raise KbitFormatError(f"--importance {self.importance} is for round-to-nearest: with "
                                  "--method gptq use --importance hessian")
        for key, (flag, owners) in dtypes.option_flags().items():
            if getattr(self, key) is not None and self.dtype not in owners:
                raise KbitFormatError(
                    f"{flag} only applies to --dtype {' or '.join(owners)}")
        data_type.validate(self)
        for b in {self.head_bits, self.embedding_bits, *(b for _, b in self.module_bits)} - {None}:
            if b != self.bits:
                data_type.validate(self.at_bits(b))
        for name in {self.head_dtype, *(d for _, d in self.module_dtypes)} - {None}:
            dtypes.get(name)  # an unknown name raises
            for b in {self.head_bits, self.embedding_bits, *(b for _, b in self.module_bits)} - {None}:
                dtypes.get(name).validate(self.at_bits(b, name))

    @property
    def head_quantized(self) -> bool:
        return self.quantize_head or self.head_bits is not None

    def at_bits(self, bits: int, dtype: str | None = None) -> QuantConfig:
        """These settings at another width (and data type), without the per-module ones. Another
        type drops this one's own options, and a weighting only fitted choices use."""
        own = dict(bits=bits, head_bits=None, embedding_bits=None, module_bits=(), head_dtype=None,
                   module_dtypes=())
        if dtype is not None and dtype != self.dtype:
            own.update({key: None for key in dtypes.option_flags()}, dtype=dtype)
            if self.scales == "absmax" and not dtypes.get(dtype).whole_rows:
                own["importance"] = "none"
        return dataclasses.replace(self, **own)

    def for_module(self, module: str) -> QuantConfig:
        """The settings `module` was quantized with: its own width (module_bits) and data type
        (module_dtypes), else these."""
        bits = dict(self.module_bits).get(module, self.bits)
        dtype = dict(self.module_dtypes).get(module, self.dtype)
        return self if (bits, dtype) == (self.bits, self.dtype) else self.at_bits(bits, dtype)

    @property
    def data_type(self) -> type[dtypes.DataType]:
        return dtypes.get(self.dtype)

    @property
    def label(self) -> str:
        """Short human name, e.g. `nf4-b64` or `fp4(E3M0)-b64`."""
        extra = "".join(f"-{x}" for x in (self.scales, self.method, self.importance)
                        if x not in ("absmax", "rtn", "none"))
        extra += "".join(f"-{name}{self.head_dtype or ''}{b}" for name, b in
                         (("head", self.head_bits), ("emb", self.embedding_bits)) if b)
        return f"{self.data_type.label(self)}-b{self.block_size}{extra}"

    def to_json(self) -> dict:
        """The `quantization_config` block of config.json."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "packing": PACKING,
            "bits": self.bits,
            "block_size": self.block_size,
            "dtype": self.dtype,
            # every type-specific key, None where this type does not read it
            **{key: None for key in dtypes.option_flags()},
            **self.data_type.option_values(self),
            "absmax_dtype": self.absmax_dtype,
            "outliers": str(self.outliers) if self.outliers else None,
            "quantize_head": self.quantize_head,
            # only when not the default, so a default conversion stays byte-identical
            **({"scales": self.scales} if self.scales != "absmax" else {}),
            **({"method": self.method} if self.method != "rtn" else {}),
            **({"importance": self.importance} if self.importance != "none" else {}),
            **({"head_bits": self.head_bits} if self.head_bits is not None else {}),
            **({"embedding_bits": self.embedding_bits} if self.embedding_bits is not None else {}),
            **({"module_bits": dict(self.module_bits)} if self.module_bits else {}),
            **({"head_dtype": self.head_dtype} if self.head_dtype is not None else {}),
            **({"module_dtypes": dict(self.module_dtypes)} if self.module_dtypes else {}),
        }

    @classmethod
    def from_json(cls, qc: dict) -> QuantConfig:
        """Parse and check a `quantization_config` strictly; refuses what this version cannot read.

        Types are exact (an int is not a bool, `bits: 4.7` is not 4), unknown keys are refused by
        name: a reader that guessed would run a model other than the one that was written."""
        if not isinstance(qc, dict):
            raise KbitFormatError("quantization_config is not a JSON object: convert the model again")
        if qc.get("quant_method") != QUANT_METHOD:
            raise KbitFormatError(
                f"quantization_config.quant_method is {qc.get('quant_method')!r}, not 'kbit'")
        version = qc.get("format_version")
        if _is_bool(version) or version not in KNOWN_FORMAT_VERSIONS:
            raise KbitFormatError(
                f"kbit format_version {version!r} is not known to this kbitrt (it reads "
                f"{', '.join(map(str, KNOWN_FORMAT_VERSIONS))}): upgrade kbitrt (pip install -U kbitrt)")
        if qc.get("packing") not in KNOWN_PACKINGS:
            raise KbitFormatError(
                f"kbit packing {qc.get('packing')!r} is not known to this kbitrt: upgrade kbitrt")
        unknown = sorted(set(qc) - set(QC_FIELDS))
        if unknown:
            raise KbitFormatError(
                f"quantization_config has keys this kbitrt does not know: {', '.join(unknown)} "
                "(written by a newer kbitrt? upgrade kbitrt, or remove them)")
        for key, (types, required) in QC_FIELDS.items():
            if key not in qc:
                if required:
                    raise KbitFormatError(f"quantization_config lacks {key!r}: convert the model again")
                continue
            value = qc[key]
            ok = isinstance(value, types) and not (_is_bool(value) and bool not in types)
            if ok and isinstance(value, list):
                ok = all(isinstance(v, str) for v in value)
            if not ok:
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise KbitFormatError(f"quantization_config.{key} is {value!r}: it must be {names}")
        data_type = dtypes.get(qc["dtype"])
        for key, (_, owners) in dtypes.option_flags().items():
            if qc.get(key) is not None and qc["dtype"] not in owners:
                raise KbitFormatError(f"quantization_config.{key} is set for dtype {qc['dtype']!r}: "
                                      f"only {' or '.join(owners)} read it")
        return cls(
            bits=qc["bits"],
            block_size=qc["block_size"],
            dtype=qc["dtype"],
            **{key: qc.get(key) for key in data_type.options},
            absmax_dtype=qc.get("absmax_dtype", "fp16"),
            outliers=OutlierSpec.parse(qc.get("outliers")),
            quantize_head=qc.get("quantize_head", False),
            scales=qc.get("scales", "absmax"),
            method=qc.get("method", "rtn"),
            importance=qc.get("importance", "none"),
            head_bits=qc.get("head_bits"),
            embedding_bits=qc.get("embedding_bits"),
            module_bits=_module_bits(qc.get("module_bits")),
            head_dtype=qc.get("head_dtype"),
            module_dtypes=_module_dtypes(qc.get("module_dtypes")),
        )


def _module_dtypes(value: dict | None) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    for module, name in value.items():
        if not isinstance(name, str):
            raise KbitFormatError(f"quantization_config.module_dtypes.{module} is {name!r}: it "
                                  "must be a data type's name")
    return tuple(sorted(value.items()))


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _module_bits(value: dict | None) -> tuple[tuple[str, int], ...]:
    if value is None:
        return ()
    for module, bits in value.items():
        if _is_bool(bits) or not isinstance(bits, int):
            raise KbitFormatError(f"quantization_config.module_bits.{module} is {bits!r}: it must "
                                  "be an int")
    return tuple(sorted(value.items()))


# `kbit convert`'s width for the output head and the input embedding unless told otherwise: 8 bits
# cost +0.1% perplexity on SmolLM2 (docs/fidelity.md) and halve the bytes the head reads per token
HEAD_BITS_DEFAULT = 8
# and their data type there: the int grid's 255 levels are c - 127 exactly, so the CPU's integer
# dot products need no codebook lookups (16 byte shuffles per 32 codes on AVX2 for nf8)
HEAD_DTYPE_AT_8 = "int"


def parse_bits16(flag: str, text: str | int | None, auto: int | None = None) -> int | None:
    """--head-bits / --embedding-bits: 3..8, 16 (None: kept in 16 bits), or auto (`auto`)."""
    if text is not None and str(text).strip().lower() == "auto":
        return auto
    if text is None or str(text).strip().lower() in ("16", "none", "off"):
        return None
    try:
        bits = int(str(text).strip())
    except ValueError:
        bits = None
    if bits is None or not MIN_BITS <= bits <= MAX_BITS:
        raise KbitFormatError(f"{flag} {text!r} is not supported: use {MIN_BITS}..{MAX_BITS}, 16 "
                              "to keep it in 16 bits, or auto")
    return bits


# quantization_config keys: (allowed JSON types, required)
QC_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "quant_method": ((str,), True),
    "format_version": ((int,), True),
    "packing": ((str,), True),
    "bits": ((int,), True),
    "block_size": ((int,), True),
    "dtype": ((str,), True),
    "exponent_bits": ((int, type(None)), False),
    "absmax_dtype": ((str,), False),
    "outliers": ((str, type(None)), False),
    "quantize_head": ((bool,), False),
    "modules_not_quantized": ((list,), False),
    "transposed_modules": ((list,), False),
    "scales": ((str,), False),
    "method": ((str,), False),
    "importance": ((str,), False),  # none | norm | hessian (format/scales.py); stored values only
    "calibration": ((dict,), False),  # GPTQ: the calibration set and settings (convert/calibrate.py)
    "head_bits": ((int, type(None)), False),  # output head width (None/absent: 16 bits)
    "embedding_bits": ((int, type(None)), False),  # input embedding width
    "module_bits": ((dict,), False),  # module -> its width, where it differs from `bits`
    "head_dtype": ((str, type(None)), False),  # head and embedding data type (absent: `dtype`)
    "module_dtypes": ((dict,), False),  # module -> its data type, where it differs from `dtype`
}


def header_metadata(config: QuantConfig, extra: dict | None = None) -> dict[str, str]:
    """Format metadata for every safetensors header (safetensors metadata is str -> str)."""
    meta = {"format": "pt", "kbit": json.dumps(config.to_json(), sort_keys=True)}
    meta.update(extra or {})
    return meta


@dataclass
class LinearLayout:
    """Shapes of the stored tensors of one quantized (N, K) linear."""

    out_features: int
    in_features: int
    config: QuantConfig
    n_outliers: int = 0
    codebook_len: int = field(default=0)

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features // self.config.block_size)

    @property
    def row_bytes(self) -> int:
        from kbitrt.format.packing import packed_row_bytes

        return packed_row_bytes(self.in_features, self.config.bits)

    def tensor_specs(self, dtype16: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """suffix -> (safetensors dtype, shape) of every stored tensor."""
        n, nb = self.out_features, self.n_blocks
        specs: dict[str, tuple[str, tuple[int, ...]]] = {
            QWEIGHT: ("U8", (n, self.row_bytes)),
            CODEBOOK: ("F32", (self.codebook_len,)),
            SHAPE: ("I64", (2,)),
        }
        if self.config.absmax_dtype == "dq8":
            specs[ABSMAX] = ("U8", (n, nb))
            specs[ABSMAX_SCALE] = ("F32", (-(-n * nb // DOUBLE_QUANT_BLOCK),))
            specs[ABSMAX_OFFSET] = ("F32", (1,))
        else:
            specs[ABSMAX] = ("F16" if self.config.absmax_dtype == "fp16" else "F32", (n, nb))
        if self.n_outliers:
            specs[OUTLIER_IDX] = ("I64", (self.n_outliers,))
            specs[OUTLIER_WEIGHT] = (dtype16, (n, self.n_outliers))
        return specs


def replace(config: QuantConfig, **changes) -> QuantConfig:
    return dataclasses.replace(config, **changes)
