"""The `tether` command line: one Typer app; each feature registers its commands from
`tether.commands.<name>` so features stay in their own modules."""

from __future__ import annotations

import importlib
import logging
import sys

import typer
from rich.console import Console

from tether.errors import TetherError

app = typer.Typer(
    name="tether",
    help="Tether: a training server for reinforcement-learning agents that live elsewhere.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
sim_app = typer.Typer(help="Simulated devices that speak Tether's wire protocols.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")

# Each module defines `register(app, sim_app)`.
COMMAND_MODULES = [
    "tether.commands.store",
    "tether.commands.train",
    "tether.commands.serve",
    "tether.commands.mqtt",
    "tether.commands.rover",
    "tether.commands.export",
]

err_console = Console(stderr=True, soft_wrap=True)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app, sim_app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user mistakes become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _register_all()
    try:
        app(args=argv, standalone_mode=True)
    except TetherError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
