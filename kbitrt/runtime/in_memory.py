"""InMemoryKbit: the KbitModel interface over a transformers model quantized in memory (tests,
the sweep), quantized with the format's own `quantize_weight`, as the converter does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kbitrt.format.config import QuantConfig



class InMemoryKbit:
    """The KbitModel interface over a transformers model quantized in memory (tests, the sweep):
    every linear except the output head (unless `quantize_head`) is quantized with the format's own
    `quantize_weight`, as the converter does. `quantize` quantizes the same original weights again
    at other settings (None: unquantized) and `load_into_model` writes the dequantized weights into
    the model, which then computes exactly what the kbit model computes."""

    def __init__(self, model: nn.Module, quant: QuantConfig | None, path: Path | None = None):
        from transformers.pytorch_utils import Conv1D

        self.model, self.path = model, path
        self.config = json.loads(model.config.to_json_string())
        head = model.get_output_embeddings()
        self.quantize_head = bool(quant and quant.quantize_head)
        # name -> (module, stored (in, out) by Conv1D, original fp32 (out, in) weight)
        self._linears: dict[str, tuple[nn.Module, bool, torch.Tensor]] = {}
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and (module is not head or self.quantize_head):
                conv = isinstance(module, Conv1D)
                w = module.weight.detach()
                self._linears[name] = (module, conv, (w.t() if conv else w).to(
                    torch.float32, memory_format=torch.contiguous_format, copy=True))
        linear_weights = {f"{name}.weight" for name in self._linears}
        # the other tensors are the model's own (not copied): only the linears are overwritten
        self._plain = {name: t.detach() for name, t in model.state_dict().items()
                       if name not in linear_weights}
        if getattr(model.config, "tie_word_embeddings", False) and head is not None:
            self._plain.pop(_param_name(model, head), None)  # tied: stored once, as the embedding
        self.quantize(quant)

    def quantize(self, quant: QuantConfig | None, given=None) -> None:
        """Quantize every linear's original weights with `quant` (None: keep them unquantized);
        `given` (name -> QuantizedWeight, e.g. GPTQ's) replaces round-to-nearest where it has one."""
        from kbitrt.format.quantizer import quantize_weight

        if quant is not None and quant.quantize_head != self.quantize_head:
            raise ValueError("quantize_head is fixed when the InMemoryKbit is made")
        self.quant = quant
        given = given if given is not None else {}
        self._quantized = {} if quant is None else {
            name: given[name] if name in given else quantize_weight(w, quant, name)
            for name, (_, _, w) in self._linears.items()}

    @property
    def linear_weights(self) -> dict[str, torch.Tensor]:
        """Original fp32 (out, in) weight of every linear that `quantize` quantizes."""
        return {name: w for name, (_, _, w) in self._linears.items()}

    @property
    def quantized_modules(self) -> list[str]:
        return list(self._quantized)

    @property
    def plain_names(self) -> list[str]:
        return list(self._plain)

    def quantized(self, name: str):
        return self._quantized[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self._plain[name]

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights transformers should see to compute exactly what the kbit model computes."""
        out = dict(self._plain)
        for name, qw in self._quantized.items():
            w = qw.dequantize()
            out[f"{name}.weight"] = w.t().contiguous() if self._linears[name][1] else w
        return out

    @torch.no_grad()
    def load_into_model(self) -> dict[str, float]:
        """Write the dequantized weights (the originals when unquantized) into the model; returns
        the relative weight error ||W' - W|| / ||W|| of each quantized linear."""
        errors = {}
        for name, (module, conv, w) in self._linears.items():
            qw = self._quantized.get(name)
            deq = w if qw is None else qw.dequantize()
            if qw is not None:
                errors[name] = ((deq - w).norm() / w.norm().clamp(min=1e-30)).item()
            module.weight.copy_(deq.t() if conv else deq)
        return errors


def _param_name(model: nn.Module, head: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return ""

