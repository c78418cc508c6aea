"""Shared by the SmolLM2 fidelity benchmarks: a text cut into non-overlapping token windows (the
GPTQ protocol) and the per-token NLL of a model over them."""

from __future__ import annotations

from pathlib import Path

import torch


def token_windows(tok, text_file: Path, seqlen: int, limit: int = 0):
    """(tokens in the text, (n, seqlen) windows, n used, n available); limit 0 = all windows."""
    ids = tok(Path(text_file).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    n_all = ids.numel() // seqlen
    n_win = min(limit, n_all) if limit else n_all
    print(f"{ids.numel()} tokens, {n_win}/{n_all} windows of {seqlen}", flush=True)
    return ids.numel(), ids[: n_win * seqlen].view(n_win, seqlen), n_win, n_all


@torch.inference_mode()
def token_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """float64 NLL of every predicted token of the (n, seqlen) windows, in order."""
    out = []
    for row in windows:
        logits = model(row[None]).logits.float()
        out.append(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="none"))
    return torch.cat(out).double()
