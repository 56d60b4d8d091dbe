"""``luoctl kho``: KHO state of a running kernel, as its debugfs shows it."""

from __future__ import annotations

import sys
from typing import Any

import click

from liveupdate.abi.physmem import PhysMem
from liveupdate.cli.common import fail
from liveupdate.cli.render import exit_with_report, show
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient, RemoteRam
from liveupdate.tools import report as report_mod


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
    show("KHO", st, as_json)


@kho.command("inspect")
@click.option("--dir", "folder", envvar="LIVEUPDATE_MACHINE", default=".machine",
              show_default=True, help="The machine's folder.")
@click.option("--in", "incoming", is_flag=True,
              help="Decode what this kernel received (kho/in/fdt) instead of what it will "
                   "hand over (the root FDT in RAM).")
@click.option("--finalize", is_flag=True,
              help="Serialize the memory map first (writes 1 to kho/out/finalize; 6.16-7.0 "
                   "kernels, skipped on 7.1+ where there is nothing to finalize).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_cmd(folder: str, incoming: bool, finalize: bool, as_json: bool) -> None:
    """Decode the running kernel's real handover, following every pointer through RAM.

    The outgoing tree is read where the next kernel will find it, in RAM (debugfs
    kho/out/fdt exists only where Linux creates it). Its memory map exists once finalized
    (--finalize, or at the kexec); on 6.16-6.18 the whole root is written only then. The
    incoming map was not preserved, as in Linux: once this kernel reuses those pages it
    decodes with errors, which are shown in place.
    """
    c = MachineClient(folder)
    try:
        if finalize:
            r = c.run([sys.executable, "-c", "from liveupdate.userspace.kexec import "
                       "kho_finalize; from liveupdate.client.syscall import Kernel; "
                       "kho_finalize(Kernel())"])
            if r["status"]:
                fail(r["stderr"].strip().splitlines()[-1])
        blob = c.debugfs("in/fdt") if incoming else c.kho_out_fdt()
        mem = PhysMem(RemoteRam(c, int(c.status()["memory"])))
        report = report_mod.describe(blob, mem)
    except LiveUpdateError as e:
        fail(e)
    exit_with_report("kho/in/fdt" if incoming else "KHO root FDT (out)", report, as_json)
