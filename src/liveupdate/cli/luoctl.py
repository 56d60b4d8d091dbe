"""``luoctl``: the command-line tool for KHO and LUO.

Subcommands load on first use (click's lazily loaded group): ``luoctl status`` should not pay
for the image parsers, the emulator and the report renderer of every other command.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# name -> "module:attribute" of the click command, in the order ``--help`` lists them
COMMANDS = {
    "machine": "liveupdate.cli.machine:machine",
    "demo": "liveupdate.cli.demo:demo",
    "status": "liveupdate.cli.update:status",
    "load": "liveupdate.cli.update:load",
    "update": "liveupdate.cli.update:update",
    "wait": "liveupdate.cli.update:wait",
    "cancel": "liveupdate.cli.update:cancel",
    "sessions": "liveupdate.cli.update:sessions",
    "kho": "liveupdate.cli.kho:kho",
    "image": "liveupdate.cli.image:image",
    "vm": "liveupdate.cli.vm:vm",
    "fleet": "liveupdate.cli.fleet:fleet",
    "realkernel": "liveupdate.cli.realkernel:realkernel",
    "inspect": "liveupdate.cli.handover:inspect",
    "capture": "liveupdate.cli.handover:capture",
    "example": "liveupdate.cli.handover:example",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        cmd: Any = getattr(importlib.import_module(module), attr)
        if not isinstance(cmd, click.Command):
            raise TypeError(f"{target} is not a click command")
        return cmd


@click.group(cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Drive and inspect Linux live updates: Kexec HandOver (KHO) and the Live Update
    Orchestrator (LUO).

    Every command prints for people by default and for scripts with --json. Errors are one
    line on standard error with the errno name, and a non-zero exit status.
    """


if __name__ == "__main__":
    main()
