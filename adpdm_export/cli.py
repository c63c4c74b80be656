"""The `adpdm` command line: a Typer app assembled from adpdm_export/commands/."""

from __future__ import annotations

import importlib
import sys

import typer

from engines.errors import AdpdmError

app = typer.Typer(
    name="adpdm",
    help="ADP-DM INT8 quantization of diffusion UNets: calibrate, export QDQ ONNX, build and run engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _load_commands() -> None:
    from adpdm_export.commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_load_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except AdpdmError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        return 2
    except typer.Abort:
        typer.secho("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
