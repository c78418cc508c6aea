"""`kbit` as an lm-eval model: `@register_model("kbit")`, a TemplateLM over kbitrt's scorer.

lm-eval 0.4.13 finds models only in its own registry (no entry-point plugins), so the class is
registered when this module is imported. Ways to use it:

    kbit eval DIR --tasks piqa,hellaswag                     # the supported path
    python -m kbitrt.eval.lm_eval_cli --model kbit --model_args pretrained=DIR --tasks piqa
    lm_eval.simple_evaluate(model=KbitLM(pretrained=DIR), tasks=[...])   # after importing this

Plain `lm_eval --model kbit` does not work: nothing imports kbitrt in that process.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from kbitrt.eval.scoring import score
from kbitrt.runtime.loader import LoadedModel


@register_model("kbit")
class KbitLM(TemplateLM):
    """A kbit folder (or a plain HF model, the baseline) for lm-eval: loglikelihood,
    loglikelihood_rolling and generate_until (greedy, stop strings)."""

    def __init__(self, pretrained: str | None = None, device: str = "auto", backend: str = "auto",
                 batch_size: int | str = 16, max_length: int | None = None,
                 lm: LoadedModel | None = None, progress: bool = True, **kwargs):
        super().__init__()
        if lm is None:
            if pretrained is None:
                raise ValueError("kbit: give model_args pretrained=DIR")
            from kbitrt.eval.model_open import open_model

            lm = open_model(pretrained, device=device or "auto", backend=backend)
        self.lm = lm
        self.tokenizer = lm.tokenizer
        # "auto" (lm-eval's batch-size search) has no meaning here: our batches are token-capped
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = int(max_length) if max_length else (lm.max_positions or 2048)
        self.progress = progress

    # ------------------------------------------------------------------------- tokenization

    @property
    def eot_token_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.lm.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "kbit").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------ scoring

    def _score(self, requests, desc: str, disable: bool) -> list[tuple[float, bool]]:
        from kbitrt.eval.progress import progress_bar

        with progress_bar(desc, len(requests), enabled=self.progress and not disable) as advance:
            return score(self.lm, requests, batch_size=self.batch_size,
                         max_length=self.max_length, on_batch=advance)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = self._score([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", disable_tqdm)
        for (key, _, _), result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        flat, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                flat.append((ctx, cont))
                owner.append(i)
        scores = self._score(flat, "loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, one request at a time, cut at the first stop string."""
        from kbitrt.eval.progress import progress_bar
        from kbitrt.runtime.generate import SamplingConfig, generate

        out = []
        with progress_bar("generate_until", len(requests),
                          enabled=self.progress and not disable_tqdm) as advance:
            for req in requests:
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
                res = generate(self.lm, [ids], max_new, SamplingConfig(temperature=0.0),
                               stop=until, compile=False)
                text = res.texts[0]
                for s in until:  # stop strings found only after decoding
                    text = text.split(s)[0]
                self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
                out.append(text)
                advance(1)
        return out
