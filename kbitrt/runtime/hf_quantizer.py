"""The "kbit" quantization config and HfQuantizer for transformers v5 (imported by hf_integration
once transformers is loaded; see that module for how loading and saving work)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from kbitrt.convert.model_map import prefix_variants
from kbitrt.format.bitplane import (BITPLANE, AnyPrecisionConfig, codebook_offset, to_bitslice,
                                    tensor_specs as bitplane_specs)
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.reader import KbitModel
from kbitrt.format.safetensors_io import SAFETENSORS_TORCH_DTYPES
from kbitrt.format.config import (ABSMAX, ABSMAX_OFFSET, ABSMAX_SCALE, CODEBOOK, OUTLIER_IDX,
                                 OUTLIER_WEIGHT, QWEIGHT, SHAPE, KbitFormatError, LinearLayout,
                                 QuantConfig, header_metadata)
from kbitrt.runtime.embedding import QuantizedEmbedding, dense_like, quantized_like
from kbitrt.runtime.experts import install_kbit_experts
from kbitrt.runtime.kernels.reference import pad_codebook
from kbitrt.runtime.linear import KbitLinear

_KBIT_BUFFERS = ("qweight", "absmax", "codebook", "outlier_idx", "outlier_weight", "bias")


class KbitConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` for kbit, kept verbatim (so save_pretrained writes back
    exactly the keys it read, `modules_not_quantized` and `transposed_modules` included).

    Given only `bits` it is a loading option (docs/any_precision.md): the width at which to load an
    any-precision (bitplane-v1) model,
    `from_pretrained(path, quantization_config=KbitConfig(bits=5))`; transformers keeps the model's
    own config and takes `load_bits` from this one (get_loading_attributes)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("quant_method", "kbit")
        self.load_bits = kwargs.pop("load_bits", None)
        if set(kwargs) <= {"quant_method", "bits"} and "bits" in kwargs:  # a loading option
            self.quant_method, self.load_bits, self.loading_only = "kbit", kwargs["bits"], True
            if not isinstance(self.load_bits, int) or not 3 <= self.load_bits <= 8:
                raise KbitFormatError(f"KbitConfig(bits={self.load_bits!r}): the width of an "
                                      "any-precision model is an int in 3..8")
            return
        if kwargs.get("packing") == BITPLANE:  # any-precision: docs/any_precision.md
            AnyPrecisionConfig.from_json(kwargs)
        else:
            QuantConfig.from_json(kwargs)  # refuses unknown format versions and packings
        self.__dict__.update(kwargs)

    def _stored(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("load_bits", "loading_only")}

    @property
    def is_any_precision(self) -> bool:
        return self.__dict__.get("packing") == BITPLANE

    @property
    def quant_config(self) -> QuantConfig:
        """The stored config; for an any-precision model, at the width it is loaded at (load_bits,
        else the file's top width; outside the file's range: one clear error)."""
        if self.__dict__.get("loading_only"):
            raise KbitFormatError(f"KbitConfig(bits={self.load_bits}) is a loading option for a "
                                  "kbit any-precision folder, not a quantization recipe")
        if not self.is_any_precision:
            if self.load_bits is not None and self.load_bits != self.__dict__.get("bits"):
                raise KbitFormatError(f"KbitConfig(bits={self.load_bits}): this is a plain "
                                      f"{self.__dict__.get('bits')}-bit kbit model; the width is "
                                      "chosen only for an any-precision model")
            return QuantConfig.from_json(self._stored())
        spec = AnyPrecisionConfig.from_json(self._stored())
        bits = spec.max_bits if self.load_bits is None else self.load_bits
        if not spec.min_bits <= bits <= spec.max_bits:
            raise KbitFormatError(f"KbitConfig(bits={bits}): this any-precision model serves "
                                  f"{spec.min_bits}..{spec.max_bits} bits")
        return spec.at(bits)

    def get_loading_attributes(self) -> dict:
        return {"load_bits": self.load_bits} if self.load_bits is not None else {}

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self._stored()))


class KbitPlaceholder(nn.Module):
    """Stands at a quantized linear while transformers loads: one buffer per stored tensor, with
    the stored name, dtype and shape, so the loader copies them in as they are."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        super().__init__()
        for name, (dtype, shape) in specs.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))
        # some models' _init_weights touch `<linear>.weight` (GPT-2's c_proj); not a buffer, so
        # it is neither loaded nor saved
        self.weight = torch.empty(0, device="meta")

    def to_kbit_linear(self, quant: QuantConfig, compute_dtype: torch.dtype) -> KbitLinear:
        b = self._buffers
        if isinstance(quant, AnyPrecisionConfig):  # the top `bits` planes, repacked; that codebook
            k_in = int(b[SHAPE][1])
            off = codebook_offset(quant.bits, quant.min_bits)
            b = dict(b, **{QWEIGHT: to_bitslice(b[QWEIGHT][:quant.bits], k_in),
                           CODEBOOK: b[CODEBOOK][off: off + 2**quant.bits]})
        qw = QuantizedWeight.from_tensors(b, quant)
        n, k = qw.shape
        bias = b.get("bias")
        absmax = qw.kernel_absmax()  # dq8 decoded once, as KbitLinear.from_quantized does
        n_out = b[OUTLIER_IDX].numel() if OUTLIER_IDX in b else 0
        # built on meta and given the loaded tensors: no zero-fill and no second copy of the codes
        mod = KbitLinear(k, n, quant.bits, quant.block_size, bias=bias is not None, n_outliers=n_out,
                         absmax_dtype=absmax.dtype, compute_dtype=compute_dtype,
                         data_type=quant.dtype, device="meta")
        mod._buffers.update(qweight=b[QWEIGHT], absmax=absmax,
                            codebook=pad_codebook(b[CODEBOOK], quant.bits).to(absmax.device))
        if n_out:
            mod._buffers.update(outlier_idx=b[OUTLIER_IDX],
                                outlier_weight=b[OUTLIER_WEIGHT].to(compute_dtype))
        else:
            mod._buffers.update(outlier_idx=torch.zeros(0, dtype=torch.int64, device=absmax.device),
                                outlier_weight=torch.zeros(n, 0, dtype=compute_dtype, device=absmax.device))
        if bias is not None:
            mod._buffers["bias"] = bias.to(compute_dtype)
        # what the runtime form changes (padded codebook, decoded dq8 scales, 16-bit dtypes), as
        # stored: save_pretrained writes these back, so a load/save round trip is exact
        mod.kbit_stored = {name: b[name] for name in (CODEBOOK, ABSMAX, ABSMAX_SCALE, ABSMAX_OFFSET)
                           if name in b and (name != ABSMAX or quant.absmax_dtype == "dq8")}
        mod.kbit_stored_dtypes = {name: b[name].dtype for name in (OUTLIER_WEIGHT, "bias") if name in b}
        return mod


def stored_tensors(mod: KbitLinear) -> dict[str, torch.Tensor]:
    """The tensors of one quantized linear in the on-disk format (docs/format.md)."""
    kept = getattr(mod, "kbit_stored", {})
    dtypes = getattr(mod, "kbit_stored_dtypes", {})
    d16 = torch.float16 if mod.outlier_weight.dtype == torch.float32 else mod.outlier_weight.dtype
    out = {QWEIGHT: mod.qweight, ABSMAX: mod.absmax,
           SHAPE: torch.tensor([mod.out_features, mod.in_features], dtype=torch.int64)}
    if CODEBOOK not in kept:
        raise KbitFormatError("this KbitLinear was not loaded from a kbit folder: its stored "
                              "codebook is unknown; write it with kbit convert")
    out.update(kept)
    if mod.outlier_idx.numel():
        out[OUTLIER_IDX] = mod.outlier_idx
        out[OUTLIER_WEIGHT] = mod.outlier_weight.to(dtypes.get(OUTLIER_WEIGHT, d16))
    if mod.bias is not None:
        out["bias"] = mod.bias.to(dtypes.get("bias", d16))
    return {k: v.detach().contiguous() for k, v in out.items()}


def _stored_specs(km: KbitModel, name: str, entry, quant, plain: set[str]) -> dict:
    """(dtype, shape) of each tensor stored for the quantized module `name`, at its own width."""
    d16 = km.info(f"{name}.{OUTLIER_WEIGHT}").dtype if entry.n_outliers else "F16"
    if isinstance(quant, AnyPrecisionConfig):  # every plane is read, `bits` kept
        stored = bitplane_specs(entry.out_features, entry.in_features, quant, entry.n_outliers, d16)
    else:
        stored = LinearLayout(entry.out_features, entry.in_features, quant.for_module(name),
                              entry.n_outliers, km.info(f"{name}.{CODEBOOK}").shape[0]
                              ).tensor_specs(d16)
    specs = {suffix: (SAFETENSORS_TORCH_DTYPES[st], tuple(shape)) for suffix, (st, shape) in stored.items()}
    if f"{name}.bias" in plain:
        info = km.info(f"{name}.bias")
        specs["bias"] = (SAFETENSORS_TORCH_DTYPES[info.dtype], tuple(info.shape))
    return specs


def _init_buffers(model, module: nn.Module, device: torch.device) -> None:
    """The buffers `module` computes rather than stores (Gemma's embed_scale), still on the meta
    device because the module was out of the model while transformers loaded: made and set by the
    model's own initializer, as transformers does for the modules it loads."""
    meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
    if meta:
        for k in meta:
            module._buffers[k] = torch.empty_like(module._buffers[k], device=device)
        model._init_weights(module)


def _find_module(model: nn.Module, name: str) -> str | None:
    """The model's name for a checkpoint module name (checkpoints saved with/without the prefix)."""
    for cand in prefix_variants(name, getattr(model, "base_model_prefix", "") or ""):
        try:
            model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    return None


class KbitHfQuantizer(HfQuantizer):
    """Loads pre-quantized kbit checkpoints (quantizing on the fly is `kbit convert`'s job)."""

    requires_calibration = True
    quantization_config: KbitConfig

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("kbit models cannot be offloaded to disk; use a device_map without 'disk'")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        from transformers.pytorch_utils import Conv1D

        if not checkpoint_files:
            raise KbitFormatError("a kbit model is loaded from its folder: from_pretrained(path)")
        km = KbitModel.open(Path(checkpoint_files[0]).parent)  # validates every shard first
        quant = self.quantization_config.quant_config
        # transformers' preprocess_model keeps its `dtype` argument to itself: the skeleton's own
        # dtype is the one from_pretrained was asked for
        self.compute_dtype = dtype if isinstance(dtype, torch.dtype) else model.dtype
        self.placed = []
        install_kbit_experts(model)  # MoE: a linear slot per expert (runtime/experts.py)
        names = set(km.plain_names)
        self.embeddings = {}  # a k-bit embedding's target -> the model's own embedding module
        for name, entry in km.modules.items():
            target = _find_module(model, name)
            if target is None:
                raise KbitFormatError(f"{km.path}: quantized module {name} is not in a "
                                      f"{type(model).__name__}")
            old = model.get_submodule(target)
            if isinstance(old, nn.Embedding):  # --embedding-bits: (vocab, dim) stored as a linear
                shape = (old.num_embeddings, old.embedding_dim)
                self.embeddings[target] = old
            elif isinstance(old, (nn.Linear, Conv1D)):
                shape = tuple(old.weight.shape)[::-1 if isinstance(old, Conv1D) else 1]
            else:
                raise KbitFormatError(f"{name} is a {type(old).__name__}, not a linear")
            if shape != (entry.out_features, entry.in_features):  # Conv1D holds (in, out)
                raise KbitFormatError(f"{km.path}: {name} is ({entry.out_features}, "
                                      f"{entry.in_features}), the model's linear is {shape}")
            model.set_submodule(target, KbitPlaceholder(_stored_specs(km, name, entry, quant, names)))
            self.placed.append((target, name))
        self.quant = quant
        self._untie_stored_once(model)

    def _untie_stored_once(self, model) -> None:
        """A tied pair stored once as a k-bit embedding has no `weight` to tie: transformers is
        told so, and the head waits, empty, to become the embedding's table after loading."""
        head = model.get_output_embeddings()
        if not self.embeddings or head is None or isinstance(head, KbitPlaceholder) \
                or not getattr(model.config, "tie_word_embeddings", False):
            return
        weights = {f"{target}.weight" for target in self.embeddings}
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        model.all_tied_weights_keys = {k: v for k, v in tied.items()
                                       if k not in weights and v not in weights}
        model.set_output_embeddings(KbitPlaceholder({}))

    def _process_model_after_weight_loading(self, model, **kwargs):
        with torch.no_grad():
            for name, stored in self.placed:
                placeholder = model.get_submodule(name)
                if any(t.is_meta for t in placeholder.buffers()):
                    missing = [k for k, t in placeholder._buffers.items() if t.is_meta]
                    raise KbitFormatError(f"{name}: tensors {missing} were not loaded")
                quant = self.quant.for_module(stored)  # the head's own width
                table = placeholder.to_kbit_linear(quant, self.compute_dtype)
                old = self.embeddings.get(name)
                if old is not None:
                    _init_buffers(model, old, table.qweight.device)
                model.set_submodule(name, table if old is None else
                                    quantized_like(old, table, self.compute_dtype))
            head = model.get_output_embeddings()
            emb = model.get_input_embeddings()
            if isinstance(emb, QuantizedEmbedding) and getattr(model.config, "tie_word_embeddings", False) \
                    and not isinstance(head, KbitLinear):  # a tied pair stored once: one table
                model.set_output_embeddings(emb.table)
        return model

    def get_state_dict_and_metadata(self, model):
        """The kbit format: every KbitLinear's stored tensors, and the format block in each header.
        A k-bit embedding's table is stored under the embedding's name; a head that is that same
        table (a tied pair stored once) is not stored again."""
        state = model.state_dict()
        seen = set()
        for name, mod in model.named_modules(remove_duplicate=False):
            if not isinstance(mod, KbitLinear):
                continue
            for b in _KBIT_BUFFERS:
                state.pop(f"{name}.{b}", None)
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            parent, _, attr = name.rpartition(".")
            if attr == "table" and isinstance(model.get_submodule(parent), QuantizedEmbedding):
                name = parent
            state.update({f"{name}.{k}": v for k, v in stored_tensors(mod).items()})
        meta = header_metadata(self.quant)
        meta.pop("format")  # transformers adds it
        return state, meta

    def _dequantize(self, model, dtype=None):
        """model.dequantize(): plain nn.Linear layers (and embeddings) with the dequantized weights."""
        from kbitrt.runtime.build import plain_linear

        if isinstance(dtype, str):  # transformers passes config.dtype, a name
            dtype = getattr(torch, dtype.removeprefix("torch."))
        dtype = dtype or torch.float32
        embeddings = {n for n, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
        for name, mod in list(model.named_modules(remove_duplicate=False)):  # a tied head too
            if name in embeddings:
                model.set_submodule(name, dense_like(mod, mod.table.dequantize(dtype)))
            elif isinstance(mod, KbitLinear) and name.rpartition(".")[0] not in embeddings:
                w = mod.dequantize(dtype)
                bias = mod.bias.to(w.dtype) if mod.bias is not None else None
                model.set_submodule(name, plain_linear(w, bias))
        return model

    def is_serializable(self, *args, **kwargs):
        # an any-precision model loaded at one width is not the file it came from
        return not self.quantization_config.is_any_precision

    @property
    def is_trainable(self) -> bool:
        return False
