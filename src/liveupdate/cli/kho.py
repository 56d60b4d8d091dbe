"""``luoctl kho``: KHO state of a running kernel, as its debugfs shows it."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from liveupdate.cli.common import fail
from liveupdate.cli.render import print_report
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient


@click.group()
def kho() -> None:
    """Kexec HandOver state of the emulated machine's kernel."""


@kho.command()
@click.option("--dir", "folder", envvar="LIVEUPDATE_MACHINE", default=".machine",
              show_default=True, help="The machine's folder.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(folder: str, as_json: bool) -> None:
    """Scratch areas, preserved pages per order, subtrees, and whether this was a KHO boot.

    "out" is what this kernel will hand over (debugfs kho/out/), "in" what it received
    (kho/in/); reserve_mem lists regions and whether they were revived.
    """
    try:
        st: dict[str, Any] = MachineClient(folder).kho_status()
    except LiveUpdateError as e:
        fail(e)
    if as_json:
        import json

        click.echo(json.dumps(st, indent=2))
    else:
        print_report("KHO", st, Console())
