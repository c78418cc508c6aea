"""`kbit`: one click group; each command parses, calls one library function, renders with rich."""

from __future__ import annotations

import sys

import click

from kbitrt import __version__
from kbitrt.errors import KbitError


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' transport errors and huggingface_hub's, whichever are installed."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx", ("TransportError", "HTTPError")), ("httpx2", ("TransportError", "HTTPError")),
                          ("requests.exceptions", ("RequestException",)),
                          ("huggingface_hub.errors", ("HfHubHTTPError", "OfflineModeIsEnabled",
                                                      "LocalEntryNotFoundError"))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def one_line(e: BaseException) -> str:
    """An expected failure as one line: what failed, on which file, and (for kbit errors) what to do."""
    if isinstance(e, OSError) and not isinstance(e, ConnectionError) and e.strerror:
        what = e.strerror + (f": {e.filename}" if e.filename else "")
        if e.filename2:
            what += f" -> {e.filename2}"
    elif isinstance(e, UnicodeDecodeError):
        what = (f"a file is not valid {e.encoding} text (byte {e.start}: {e.reason}): give a UTF-8 "
                "text file")
    elif isinstance(e, KbitError):
        what = str(e)
    else:
        what = f"{type(e).__name__}: {e}"
    return one_line_text(what)


def one_line_text(what: str) -> str:
    text = " ".join(what.split())
    return text if len(text) <= 600 else text[:597] + "..."


class KbitGroup(click.Group):
    """Known failures (bad input, broken files, I/O, network) end as one clear line on stderr with
    exit code 2; `kbit --debug ...` shows the traceback instead. Anything else is a bug and keeps
    its traceback."""

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.UsageError as e:  # a bad option or argument: one line, with where to look
            if debug:
                raise
            sub = e.ctx.command_path if e.ctx is not None else "kbit"
            click.secho(f"error: {one_line_text(e.format_message())} (see {sub} --help)",
                        fg="red", err=True)
            sys.exit(2)
        except (KbitError, OSError, UnicodeDecodeError) + _network_errors() as e:
            if debug:
                raise
            click.secho(f"error: {one_line(e)}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            click.secho("interrupted", fg="red", err=True)
            sys.exit(130)


@click.group(cls=KbitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kbit")
@click.option("--debug", is_flag=True, help="show the full traceback of any error")
def cli(debug: bool) -> None:
    """kbitrt: k-bit (3..8) quantization of LLMs: convert, inspect, run, evaluate."""


def _register() -> None:
    from kbitrt.cli.convert import convert_cmd, dequantize_cmd, inspect_cmd

    cli.add_command(convert_cmd)
    cli.add_command(dequantize_cmd)
    cli.add_command(inspect_cmd)
    cli.add_command(__import__("kbitrt.cli.run", fromlist=["run_cmd"]).run_cmd)
    cli.add_command(__import__("kbitrt.cli.push", fromlist=["push_cmd"]).push_cmd)
    cli.add_command(__import__("kbitrt.cli.eval", fromlist=["eval_cmd"]).eval_cmd)
    cli.add_command(__import__("kbitrt.cli.bench", fromlist=["bench_cmd"]).bench_cmd)
    cli.add_command(__import__("kbitrt.cli.serve", fromlist=["serve_cmd"]).serve_cmd)
    from kbitrt.cli.sweep import plot_cmd, sweep_cmd

    cli.add_command(sweep_cmd)
    cli.add_command(plot_cmd)


_register()
