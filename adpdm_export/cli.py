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
    """Entry point: user errors become one line on stderr and exit status 2.

    Click handles usage errors itself (standalone mode: message and exit 2); our own
    `AdpdmError` propagates out of it and is printed here without a traceback.
    """
    try:
        app(args=argv, standalone_mode=True)
    except AdpdmError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
