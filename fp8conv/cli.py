"""The `fp8conv` command line: a root group whose commands live in fp8conv/commands/, one module
each, imported only when that command runs (so `--help` stays fast: no torch, no triton here).

Errors: every command raises fp8conv.errors.Fp8convError subclasses; `main` prints them in one
place and exits with their code (2 bad input, 1 regression). FP8CONV_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from fp8conv import __version__

# command name -> (module, attribute, one-line help shown by `fp8conv --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quantize": ("fp8conv.commands.quantize", "quantize", "Convert an FP16/BF16 checkpoint to FP8."),
    "inspect": ("fp8conv.commands.inspect", "inspect_cmd", "Weight (and activation) statistics."),
    "recipe": ("fp8conv.commands.recipe", "recipe", "Show the built-in quantization recipes."),
    "synth": ("fp8conv.commands.synth", "synth", "Write a random-initialised OneRec-V2 checkpoint."),
    "example": ("fp8conv.commands.example", "example", "Write the bundled trained OneRec-V2 example."),
    "verify": ("fp8conv.commands.verify", "verify", "Gate a release: FP8 vs FP16 on the reference runtime."),
    "tune": ("fp8conv.commands.tune", "tune", "Autotune a checkpoint's Triton kernels on this GPU."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (_, _, h) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fp8conv")
def cli() -> None:
    """fp8conv: FP8 post-training quantization for OneRec-V2-style generative recommenders.

    Release pipeline: quantize -> tune -> verify. Exit codes: 0 ok, 1 regression, 2 bad input.
    Set FP8CONV_DEBUG=1 for tracebacks.
    """


def main(argv: list[str] | None = None) -> int:
    from fp8conv.errors import Fp8convError

    try:
        rv = cli.main(args=argv, prog_name="fp8conv", standalone_mode=False)
    except Fp8convError as e:
        if os.environ.get("FP8CONV_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return 2  # usage errors are bad input too
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
