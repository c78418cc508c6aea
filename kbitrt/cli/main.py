"""`kbit`: one click group; each command parses, calls one library function, renders with rich."""

from __future__ import annotations

import sys

import click

from kbitrt import __version__
from kbitrt.errors import KbitError


class KbitGroup(click.Group):
    """Known failures (bad input, broken files) end as one clear line on stderr, exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (KbitError, FileNotFoundError, NotADirectoryError) as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="red", err=True)
            sys.exit(130)


@click.group(cls=KbitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kbit")
def cli() -> None:
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
    from kbitrt.cli.sweep import plot_cmd, sweep_cmd

    cli.add_command(sweep_cmd)
    cli.add_command(plot_cmd)


_register()
