"""`kbit serve`: an OpenAI-compatible HTTP server with continuous batching (kbitrt/serve)."""

from __future__ import annotations

import click
from rich.console import Console

from kbitrt.cli.options import (cpu_weight_options, placement_options, resolve_cpu_weights,
                                resolve_kv_cache)


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (127.0.0.1: this machine only).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="KBIT_API_KEY",
              help="Require `Authorization: Bearer KEY` on every API request (env KBIT_API_KEY).")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded together (continuous batching).")
@click.option("--ctx", default=None, type=click.IntRange(min=2),
              help="Tokens per request, prompt + answer (default: the model's, at most 2048); "
                   "the KV cache holds --max-batch x --ctx.")
@click.option("--model-name", default=None, help="The name clients send as `model` "
              "(default: the model folder's name).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--backend", type=click.Choice(["auto", "native", "transformers"]), default="auto",
              show_default=True, help="transformers: one request at a time.")
@placement_options
@cpu_weight_options
@click.option("--draft-bits", type=int, default=None, help="Any-precision models: "
              "self-speculative decoding (one request at a time).")
def serve_cmd(model, host, port, api_key, max_batch, ctx, model_name, device, backend, bits,
              device_map, max_memory, low_memory, cpu_weights, kv_cache, draft_bits):
    """Serve a kbit model over the OpenAI API (chat page at /).

    \b
      kbit serve DIR                     (http://127.0.0.1:8000, chat page at /)
      kbit serve DIR --port 8080 --api-key SECRET --max-batch 8 --ctx 1024
    """
    from kbitrt.serve.server import check_installed

    check_installed()
    from kbitrt.runtime.loader import load_model
    from kbitrt.serve.server import model_id_for, open_engine, run_server

    err = Console(stderr=True)
    kw = dict(device=device, backend=backend, cpu_weights=resolve_cpu_weights(low_memory, cpu_weights),
              kv_cache=resolve_kv_cache(low_memory, kv_cache))
    spec = None
    with err.status(f"loading {model}", spinner="dots"):
        if draft_bits is not None:
            from kbitrt.runtime.speculative import DEFAULT_DRAFT_TOKENS, load_speculative

            lm, parent = load_speculative(model, bits, draft_bits, **kw)
            spec = dict(bits=parent, draft_bits=draft_bits, draft_tokens=DEFAULT_DRAFT_TOKENS)
        else:
            lm = load_model(model, bits=bits, device_map=device_map, max_memory=max_memory, **kw)
    served = open_engine(lm, model_name or model_id_for(model, lm), max_batch, ctx, spec)
    if lm.note:
        err.print(f"[yellow]note:[/] {lm.note}", soft_wrap=True)
    err.print(f"serving [bold]{served.model_id}[/] ({lm.quant_label}, {lm.backend}, "
              f"{lm.device}) on http://{host}:{port}: {served.how}", soft_wrap=True)
    run_server(served, host, port, api_key)
