"""Calibration (GPTQ, --importance hessian|random): a source checkpoint, layer by layer through the
native decoder, into the quantized linears the converter writes.

GPTQ needs each decoder layer's inputs on calibration data, so it needs the model's forward, which
lives in model/ (the generic decoder, below convert: format <- model <- convert). The per-linear
algorithm lives in convert/gptq.py; converter.convert() runs this driver when the config asks for
calibration and writes what it hands back.

Streaming: only the embedding modules, one decoder layer (fp32) and the calibration activations are
in memory at a time: 2 x samples x seqlen x hidden x 4 bytes (128 x 2048 x 4096 = 8.6 GB for a
Llama-7B; 1.2 GB for SmolLM2-135M) plus one (K, K) float32 Hessian per linear of the layer. Every
finished linear goes to a temporary folder on disk (packed, as stored), not to memory. Each layer's
linears are quantized from the layer's fp inputs (computed through the layers already quantized,
as GPTQ does), then the layer is run again with its quantized weights to give the next layer's
inputs. The output head is not part of a decoder layer: with --quantize-head it is rounded to
nearest as usual.

`--method rtn --importance hessian` takes the same path with round-to-nearest instead of GPTQ: each
linear is rounded to nearest with mse block scales (and/or a Lloyd codebook) whose search weights
each input column's squared error by the diagonal of H, the column's input second moment on the
calibration data (format/scales.py), i.e. the scale that minimises the expected output error of the
block rather than its weight error. `--importance random` does the same with uniformly random
token ids (seeded) in place of calibration text: no data, only the model's own forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kbitrt.convert.staging import release_temp_folder, temp_folder
from kbitrt.convert.checkpoint import CheckpointTensors
from kbitrt.convert.gptq import Hessian, gptq_quantize
from kbitrt.convert.model_map import build_model_map
from kbitrt.convert.source import find_checkpoint
from kbitrt.errors import KbitFormatError
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.config import QuantConfig
from kbitrt.format.quantizer import quantize_weight
from kbitrt.model.decoder import Decoder, default_positions
from kbitrt.model.families import (checkpoint_names, family_for, hf_config, model_args,
                                   rope_frequencies, why_not_native)

BATCH = 4  # calibration rows per forward
Progress = Callable[[str, int, int], None]
_FIELDS = ("qweight", "absmax", "codebook", "absmax_scale", "absmax_offset", "outlier_idx",
           "outlier_weight")


class GPTQResults:
    """GPTQ-quantized linears by checkpoint module name, kept in a temporary folder on disk."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder or temp_folder("kbit-gptq-"))  # gone on exit and SIGTERM
        self.names: list[str] = []

    def put(self, module: str, qw: QuantizedWeight) -> None:
        data = {f: getattr(qw, f) for f in _FIELDS if getattr(qw, f) is not None}
        data["meta"] = torch.tensor([qw.shape[0], qw.shape[1], qw.bits, qw.block_size])
        torch.save(data, self.folder / f"{len(self.names)}.pt")
        self.names.append(module)

    def __contains__(self, module: str) -> bool:
        return module in self.names

    def __getitem__(self, module: str) -> QuantizedWeight:
        if module not in self.names:
            raise KeyError(module)
        data = torch.load(self.folder / f"{self.names.index(module)}.pt", weights_only=True)
        n, k, bits, block = data.pop("meta").tolist()
        return QuantizedWeight(shape=(n, k), bits=bits, block_size=block, **data)

    def keys(self) -> list[str]:
        return list(self.names)

    def items(self):
        return ((m, self[m]) for m in self.names)

    def close(self) -> None:
        release_temp_folder(self.folder)


class _Weights:
    """Reads the native decoder's tensors from a plain checkpoint, by canonical name."""

    def __init__(self, folder: Path, trust_remote_code: bool):
        self.map = build_model_map(folder, trust_remote_code)
        self.tensors = CheckpointTensors(find_checkpoint(folder))
        self.keys = {}
        for key in self.tensors.names():
            name = self.map.canonical(key)
            if name is not None:
                self.keys[name] = key

    def pick(self, names: str) -> str:
        options = names.split("|")
        return next((o for o in options if f"{o}.weight" in self.keys), options[0])

    def get(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise KbitFormatError(f"the checkpoint lacks {name!r}")
        return self.tensors.read(self.keys[name]).float()

    def fill(self, model: nn.Module, ours: str, theirs: str) -> None:
        """Give module `ours` of the (meta) decoder its fp32 tensors, in the (out, in) layout."""
        module = model.get_submodule(ours)
        for pname, p in list(module.named_parameters(recurse=False)):
            t = self.get(f"{theirs}.{pname}")
            if pname == "weight" and isinstance(module, nn.Linear) and self.map.linears.get(theirs):
                t = t.t().contiguous()  # GPT-2 Conv1D stores (in, out)
            if tuple(t.shape) != tuple(p.shape):
                raise KbitFormatError(f"{theirs}.{pname} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(p.shape)}")
            setattr(module, pname, nn.Parameter(t, requires_grad=False))


def _embed(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's forward up to the first layer (as Decoder.forward computes it)."""
    input_pos, pad = default_positions(ids, None, None)
    return model.embed(ids, (input_pos[None, :] - pad[:, None]).clamp(min=0))


def _layer_context(model: Decoder, seqlen: int):
    """(input_pos, rope, mask) for full causal windows of `seqlen` tokens, no padding."""
    ids = torch.zeros(1, seqlen, dtype=torch.long)
    input_pos, pad = default_positions(ids, None, None)
    rope = None
    if model.args.positions == "rotary":
        freqs = input_pos[None, :, None].float() * model.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        rope = ((emb.cos() * model.rope_scaling), (emb.sin() * model.rope_scaling))
    return input_pos, rope, model.masks(input_pos, pad, torch.float32)


def _native_decoder_args(folder: Path, calib: torch.Tensor):
    """(HF config, model args, family spec) of the checkpoint `folder`, after the checks that the
    layer loop can run it, on calibration tokens `calib` (n, T)."""
    raw = json.loads((folder / "config.json").read_text())
    hfc = hf_config(raw)
    why = why_not_native(hfc)
    if why:
        raise KbitFormatError(f"--method gptq runs through the native decoder: {why}")
    if calib.ndim != 2 or not calib.numel():
        raise KbitFormatError("GPTQ needs calibration tokens (samples x seqlen)")
    args, spec = model_args(hfc), family_for(hfc)
    if args.n_experts or args.rope_types:  # the layer loop below runs one rotary table, no routing
        raise KbitFormatError(f"--method gptq does not handle {hfc.model_type!r} models yet "
                              "(Mixture-of-Experts layers or rotary tables per layer type): use "
                              "--method rtn")
    if args.positions == "learned" and args.max_positions and calib.shape[1] > args.max_positions:
        raise KbitFormatError(f"--calib-seqlen {calib.shape[1]} exceeds the model's "
                              f"{args.max_positions} positions")
    return hfc, args, spec


def _first_layer_inputs(model: Decoder, src: _Weights, names: dict, hfc, args,
                        calib: torch.Tensor) -> torch.Tensor:
    """The first decoder layer's inputs on `calib`: the (meta) decoder's embedding modules filled
    from the checkpoint, its positions set up, the windows embedded BATCH at a time."""
    for ours in ("tok_emb", "pos_emb", "project_in", "emb_norm"):
        if ours in names and hasattr(model, ours):
            src.fill(model, ours, src.pick(names[ours]))
    if args.positions == "rotary":
        model.setup_positions(*rope_frequencies(hfc, args, seq_len=args.max_positions or 0))
    else:
        model.setup_positions(None)
    calib = calib.long()
    return torch.cat([_embed(model, calib[i: i + BATCH]) for i in range(0, calib.shape[0], BATCH)])


def _quantize_layer(model: Decoder, li: int, src: _Weights, names: dict, quantizable: set,
                    xs: torch.Tensor, context: tuple, config: QuantConfig, results: GPTQResults, *,
                    damp: float, act_order: bool, dtype16: torch.dtype) -> torch.Tensor:
    """Decoder layer `li`: its fp32 weights from the checkpoint, each linear's Hessian from the
    layer's inputs `xs`, every linear quantized (GPTQ or calibrated round-to-nearest) into
    `results` and put back dequantized; returns the layer's outputs through the quantized weights
    (the next layer's inputs)."""
    input_pos, rope, mask = context
    prefix = f"layers.{li}."
    block_names = {o: src.pick(t) for o, t in names.items() if o.startswith(prefix)}
    for ours, theirs in block_names.items():
        src.fill(model, ours, theirs)
    layer = model.layers[li]
    linears = {ours: theirs for ours, theirs in block_names.items()
               if isinstance(model.get_submodule(ours), nn.Linear) and theirs in quantizable}
    hess = {ours: Hessian(model.get_submodule(ours).in_features) for ours in linears}
    memo: dict = {}  # q/k/v (gate/up) read the same input: x^T x once

    def hook(h: Hessian):
        def add(module, inp):
            same = memo.get("x") is inp[0]
            memo["xtx"] = h.add(inp[0], memo["xtx"] if same else None)
            memo["x"] = inp[0]
        return add

    hooks = [model.get_submodule(ours).register_forward_pre_hook(hook(hess[ours]))
             for ours in linears]

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x[i: i + BATCH], input_pos, rope, mask)
                          for i in range(0, x.shape[0], BATCH)])

    run(xs)
    for h in hooks:
        h.remove()
    for ours, theirs in linears.items():
        lin = model.get_submodule(ours)
        if config.method == "gptq":
            qw = gptq_quantize(lin.weight.data, hess[ours].matrix(), config, damp=damp,
                               act_order=act_order, name=theirs, dtype16=dtype16)
        else:  # calibrated round-to-nearest: the Hessian diagonal weights the scale search
            qw = quantize_weight(lin.weight.data, config, theirs, dtype16,
                                 importance=torch.diagonal(hess[ours].matrix()).float())
        lin.weight.data = qw.dequantize(torch.float32)
        results.put(theirs, qw)
        del hess[ours]
    return run(xs)


@torch.no_grad()
def gptq_quantize_model(folder: str | Path, config: QuantConfig, calib: torch.Tensor, *,
                        damp: float = 0.01, act_order: bool = False, progress: Progress | None = None,
                        trust_remote_code: bool = False, results: GPTQResults | None = None,
                        dtype16: torch.dtype = torch.float16) -> GPTQResults:
    """GPTQ every linear of every decoder layer of the HF checkpoint `folder` on calib (n, T);
    with `config.method == "rtn"` (and importance "hessian") round each to nearest instead, its
    scale search weighted by the Hessian diagonal."""
    if config.method != "gptq" and config.importance not in ("hessian", "random"):
        raise KbitFormatError("calibration is for --method gptq or --importance hessian|random")
    if results is None:  # ours: removed when anything below fails
        results = GPTQResults()
        try:
            return gptq_quantize_model(folder, config, calib, damp=damp, act_order=act_order,
                                       progress=progress, trust_remote_code=trust_remote_code,
                                       results=results, dtype16=dtype16)
        except BaseException:
            results.close()
            raise
    folder = Path(folder)
    hfc, args, spec = _native_decoder_args(folder, calib)
    names = checkpoint_names(spec, args.n_layers)
    src = _Weights(folder, trust_remote_code)
    with torch.device("meta"):
        model = Decoder(args)
    xs = _first_layer_inputs(model, src, names, hfc, args, calib)
    context = _layer_context(model, calib.shape[1])
    results = results or GPTQResults()
    quantizable = set(src.map.linears) - {src.map.head}
    for li in range(args.n_layers):
        xs = _quantize_layer(model, li, src, names, quantizable, xs, context, config, results,
                             damp=damp, act_order=act_order, dtype16=dtype16)
        model.layers[li] = nn.Identity()  # free the layer's weights
        if progress:
            progress(f"GPTQ layer {li + 1}/{args.n_layers}", li + 1, args.n_layers)
    return results


def calibration_windows(folder: Path, text: str, samples: int, seqlen: int) -> torch.Tensor:
    """(n, seqlen) token windows: the text's last `samples` non-overlapping windows, in order. The
    end of the text, so that calibrating and evaluating on one text (`--calib wiki-sample` beside
    `--ppl wiki-sample --max-tokens N`, whose windows start at its beginning) keep apart."""
    from transformers import AutoTokenizer

    if samples < 1 or seqlen < 2:
        raise KbitFormatError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:  # no or unusable tokenizer files
        raise KbitFormatError(f"{folder}: no usable tokenizer to read the calibration text with "
                              f"({type(e).__name__}): add the model's tokenizer files, or use "
                              "--importance random (no data)") from None
    ids = torch.tensor(tok(text).input_ids, dtype=torch.long)
    n = min(samples, ids.numel() // seqlen)
    if n < 1:
        raise KbitFormatError(f"the calibration text has {ids.numel()} tokens, fewer than one "
                              f"window of --calib-seqlen {seqlen}")
    return ids[ids.numel() - n * seqlen:].view(n, seqlen)


def random_windows(folder: Path, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(samples, seqlen) token ids drawn uniformly from the model's vocabulary (seeded): the inputs
    of `--importance random`, which needs no data."""
    if samples < 1 or seqlen < 2:
        raise KbitFormatError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    hfc = hf_config(json.loads((Path(folder) / "config.json").read_text()))
    why = why_not_native(hfc)
    if why:
        raise KbitFormatError(f"--importance random runs through the native decoder: {why}")
    args = model_args(hfc)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (samples, seqlen), generator=g)


@dataclass(frozen=True)
class Calibration:
    """What calibration reads: `text` (None: seeded random token ids, `--importance random`),
    `samples` windows of `seqlen` tokens; GPTQ's dampening and column order."""
    text: str | None = None
    name: str = "random tokens"  # the text's dataset name, recorded in the config
    samples: int = 128
    seqlen: int = 2048
    damp: float = 0.01
    act_order: bool = False


def needs_calibration(config: QuantConfig) -> bool:
    """Whether a config's linears are quantized on the model's forward (GPTQ, --importance
    hessian|random) rather than streamed to nearest."""
    return config.method == "gptq" or config.importance in ("hessian", "random")


def check_calibration(config: QuantConfig, calibration: Calibration) -> None:
    """The calibration options' errors, one line each, before anything is read."""
    if config.importance == "random" and calibration.text is not None:
        raise KbitFormatError("--importance random reads random tokens, not --calib text")
    if config.importance != "random" and calibration.text is None:
        what = "--method gptq" if config.method == "gptq" else f"--importance {config.importance}"
        raise KbitFormatError(f"{what} needs the model's forward on calibration text: --calib "
                              "(convert(calibration=Calibration(text=...)))")
    if not calibration.damp > 0:
        raise KbitFormatError("--damp must be > 0 (a fraction of the mean Hessian diagonal)")


def calibrate(folder: Path, config: QuantConfig, calibration: Calibration, *,
              trust_remote_code: bool = False,
              progress: Progress | None = None) -> tuple[GPTQResults, dict]:
    """Quantize the checkpoint `folder`'s decoder linears on its calibration windows: (the results,
    to be written by the converter and closed after, the quantization_config record)."""
    cal = calibration
    if cal.text is None:
        calib = random_windows(folder, cal.samples, cal.seqlen)
    else:
        calib = calibration_windows(folder, cal.text, cal.samples, cal.seqlen)
    results = gptq_quantize_model(folder, config, calib, damp=cal.damp, act_order=cal.act_order,
                                  progress=progress, trust_remote_code=trust_remote_code)
    record = {"calibration": {"dataset": cal.name, "samples": calib.shape[0],
                              "seqlen": calib.shape[1],
                              **({"damp": cal.damp, "act_order": cal.act_order}
                                 if config.method == "gptq" else {}),
                              "windows": "uniform over the vocabulary, seed 0" if cal.text is None
                              else "last non-overlapping windows of the text"}}
    return results, record
