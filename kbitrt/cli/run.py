"""`kbit run`: generate text with a kbit model (one-shot, batched, piped, or interactive chat).

Generated text goes to stdout; progress, notes and the stats table go to stderr, so
`kbit run DIR -p ... > out.txt` keeps only the text. `--json` prints one JSON document instead.
"""

from __future__ import annotations

import json
import math
import sys

import click
import torch
from rich.console import Console
from rich.table import Table

from kbitrt.cli.options import (cpu_weight_options, placement_options, resolve_cpu_weights,
                                resolve_kv_cache)
from kbitrt.errors import KbitError

COMPUTE_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


@click.command("run")
@click.argument("model")
@click.option("-p", "--prompt", "prompts", multiple=True,
              help="Prompt; repeat for a batch (left-padded). Default: read stdin.")
@click.option("--chat", is_flag=True, help="Interactive chat with the model's chat template "
              "(with -p: one chat turn per prompt).")
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default unless --temperature).")
@click.option("-t", "--temperature", type=float, default=None, help="Sampling temperature (0: greedy).")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--stop", "stops", multiple=True, help="Stop string; repeatable.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--backend", type=click.Choice(["auto", "native", "transformers"]), default="auto",
              show_default=True, help="native decoder, or transformers with KbitLinear "
              "(auto: native when it knows the family).")
@click.option("--dtype", type=click.Choice(list(COMPUTE_DTYPES)), default="auto", show_default=True,
              help="Activation dtype (auto: fp32 on cpu, the model's bf16/fp16 on cuda).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the decode step (default: on for cuda; on the CPU the "
                   "default C++ layer stack is faster, docs/cpu.md).")
@placement_options
@cpu_weight_options
@click.option("--draft-bits", type=int, default=None, help="Any-precision models: self-speculative"
              " decoding, this narrower width drafting for the --bits parent (same planes).")
@click.option("--draft-tokens", type=int, default=None, help="Tokens drafted per round with "
              "--draft-bits (default 4).")
@click.option("--json", "as_json", is_flag=True, help="Print results and stats as JSON.")
def run_cmd(model, prompts, chat, max_new_tokens, greedy, temperature, top_k, top_p,
            repetition_penalty, seed, stops, device, backend, dtype, compile_, low_memory,
            cpu_weights, kv_cache, device_map, max_memory, draft_bits, draft_tokens, as_json,
            bits=None):
    """Generate text with a kbit model (a folder or a Hub repo id).

    \b
      kbit run DIR -p "The capital of France is" --max-new-tokens 64
      kbit run DIR --chat                 (/reset, /exit; Ctrl-C stops an answer, Ctrl-D quits)
      echo "Once upon a time" | kbit run DIR --temperature 0.8 --top-p 0.95 --seed 0
      kbit run DIR -p a -p b -p c --greedy
      kbit run AP_DIR --bits 8 --draft-bits 3 -p "..."   (self-speculative, any-precision)
    """
    from kbitrt.runtime.generate import SamplingConfig
    from kbitrt.errors import RunError

    err = Console(stderr=True)
    try:
        cpu_weights = resolve_cpu_weights(low_memory, cpu_weights)
        kv_cache = resolve_kv_cache(low_memory, kv_cache)
        for flag, value in (("--temperature", temperature), ("--top-p", top_p),
                            ("--repetition-penalty", repetition_penalty)):
            if value is not None and not math.isfinite(value):  # nan/inf pass every range check
                raise RunError(f"{flag} {value}: must be a finite number")
        if greedy and temperature not in (None, 0):
            raise RunError("--greedy and --temperature contradict each other: give one")
        sampling = SamplingConfig(temperature=0.0 if greedy or temperature is None else temperature,
                                  top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                  seed=seed)
        interactive = chat and not prompts
        if not prompts and not interactive:
            if sys.stdin.isatty():
                raise RunError("no prompt: give -p TEXT, pipe text on stdin, or use --chat")
            text = sys.stdin.read().rstrip("\n")
            if not text.strip():
                raise RunError("no prompt: stdin was empty")
            prompts = (text,)
        from kbitrt.runtime.loader import load_model

        spec = {}
        if draft_tokens is not None and draft_bits is None:
            raise RunError("--draft-tokens needs --draft-bits (self-speculative decoding)")
        if draft_bits is not None:
            from kbitrt.runtime.speculative import DEFAULT_DRAFT_TOKENS, load_speculative

            if device_map is not None:
                raise RunError("--draft-bits runs on one device: drop --device-map")
            k = DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens
            with err.status(f"loading {model}", spinner="dots"):  # widths checked first
                lm, parent = load_speculative(model, bits, draft_bits, k, device=device,
                                              backend=backend, dtype=COMPUTE_DTYPES[dtype],
                                              cpu_weights=cpu_weights, kv_cache=kv_cache)
            spec = dict(bits=parent, draft_bits=draft_bits, draft_tokens=k)
        else:
            with err.status(f"loading {model}", spinner="dots"):
                lm = load_model(model, device=device, backend=backend, dtype=COMPUTE_DTYPES[dtype],
                                cpu_weights=cpu_weights, bits=bits, device_map=device_map,
                                max_memory=max_memory, kv_cache=kv_cache)
        if lm.note and not as_json:
            err.print(f"[yellow]note:[/] {lm.note}")
        compile_mode = "auto" if compile_ is None else compile_
        if interactive:
            return _chat_loop(lm, max_new_tokens, sampling, stops, compile_mode, err, spec)
        result = _one_shot(lm, list(prompts), chat, max_new_tokens, sampling, stops,
                           compile_mode, as_json, spec)
    except (KbitError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(_json(model, lm, list(prompts), result), indent=2))
    else:
        err.print(stats_table(lm, result.stats))


def _one_shot(lm, prompts, chat, max_new_tokens, sampling, stops, compile_mode, as_json, spec):
    stream = len(prompts) == 1 and not as_json
    if stream and not chat:
        click.echo(prompts[0], nl=False)
    on_text = (lambda row, text: click.echo(text, nl=False)) if stream else None
    result = _generate(lm, prompts, max_new_tokens, sampling, stops, chat, on_text, compile_mode,
                       spec)
    if stream:
        click.echo()
    elif not as_json:
        for i, (prompt, text) in enumerate(zip(prompts, result.texts)):
            if i:
                click.echo()
            click.echo(text if chat else prompt + text)
    return result


def _generate(lm, prompts, max_new_tokens, sampling, stops, chat, on_text, compile_mode, spec):
    """generate(), or its self-speculative twin when `spec` (bits, draft_bits, draft_tokens)."""
    if spec:
        from kbitrt.runtime.speculative import generate_speculative
        return generate_speculative(lm, prompts, max_new_tokens, sampling, stops, chat, on_text,
                                    **spec)
    from kbitrt.runtime.generate import generate
    return generate(lm, prompts, max_new_tokens, sampling, stops, chat, on_text, compile_mode)


def _read_line(prompt: str) -> str:
    """One line from the user: with line editing and history (readline) in a terminal."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        return input(prompt)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def _chat_loop(lm, max_new_tokens, sampling, stops, compile_mode, err: Console, spec):
    """Interactive chat: answers stream as they are generated; the conversation is kept and sent
    again each turn. /reset forgets it, /exit (or Ctrl-D) quits, Ctrl-C stops an answer (what was
    shown is kept) or clears the line being typed, and never ends the session."""
    from kbitrt.errors import RunError

    err.print("[dim]chat: /reset forgets the conversation, /exit or Ctrl-D quits, "
              "Ctrl-C stops an answer[/]")
    messages: list[dict] = []
    stats = None
    while True:
        try:
            line = _read_line("> ")
        except EOFError:  # Ctrl-D
            click.echo(err=True)
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, the session goes on
            click.echo("^C", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = []
            err.print("[dim]conversation reset[/]")
            continue
        messages.append({"role": "user", "content": line})
        shown: list[str] = []

        def on_text(row: int, piece: str) -> None:
            shown.append(piece)
            click.echo(piece, nl=False)

        try:
            result = _generate(lm, [messages], max_new_tokens, sampling, stops, True, on_text,
                               compile_mode, spec)
        except KeyboardInterrupt:  # Ctrl-C while answering: stop this answer, keep the session
            click.echo()
            err.print("[yellow]\\[stopped][/]")
            messages.append({"role": "assistant", "content": "".join(shown)})
            continue
        except RunError as e:  # e.g. the conversation outgrew the context: start over
            click.echo()
            err.print(f"[red]error:[/] {e}; use /reset")
            messages.pop()
            continue
        click.echo()
        messages.append({"role": "assistant", "content": result.texts[0]})
        stats = result.stats
        turns = sum(m["role"] == "user" for m in messages)
        err.print(f"[dim]{stats.new_tokens} tokens, {stats.new_tokens_per_s:.1f} tok/s, "
                  f"{turns} turn{'s' if turns != 1 else ''} in context[/]")
    if stats is not None:
        err.print(stats_table(lm, stats))


def stats_table(lm, stats) -> Table:
    table = Table(title=f"{lm.path.name if lm.path else 'model'} ({lm.quant_label}, {lm.backend})",
                  show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("prompt", f"{stats.prompt_tokens} tok, {stats.prompt_tokens_per_s:.1f} tok/s")
    table.add_row("generation", f"{stats.new_tokens} tok, {stats.new_tokens_per_s:.1f} tok/s")
    table.add_row("batch", str(stats.batch))
    spec = getattr(stats, "speculation", None)
    if spec:
        rate = spec["acceptance_rate"]
        table.add_row("speculation", f"{spec['draft_bits']}-bit drafts of {spec['draft_tokens']} "
                      f"for {spec['bits']} bits: "
                      + (f"{100 * rate:.0f}% accepted, {spec['tokens_per_round']:.2f} tok/round"
                         if rate is not None else "nothing drafted"))
    table.add_row("peak memory", f"{stats.peak_memory_bytes / 2**20:.0f} MiB")
    held = f" ({lm.cpu_weights} on the CPU)" if getattr(lm, "cpu_weights", None) else ""
    table.add_row("weights", f"{lm.weight_bytes / 2**20:.1f} MiB{held}")
    if lm.backend == "native":  # the KV cache's dtype (--kv-cache; fp16 with --low-memory)
        kv = getattr(lm.model, "kv_dtype", None) or lm.dtype
        table.add_row("KV cache", str(kv).replace("torch.", ""))
    table.add_row("device", stats.device + (" (compiled)" if stats.compiled else ""))
    return table


def _json(model, lm, prompts, result) -> dict:
    return {
        "model": str(model), "path": str(lm.path) if lm.path else None, "backend": lm.backend,
        "note": lm.note, "quantization": lm.quant_label, "dtype": str(lm.dtype).replace("torch.", ""),
        "results": [{"prompt": p, "text": t, "stop_reason": r, "new_tokens": len(ids)}
                    for p, t, r, ids in zip(prompts, result.texts, result.stop_reasons,
                                            result.token_ids)],
        "stats": result.stats.to_json(),
    }
