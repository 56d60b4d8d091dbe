"""``luoctl vm status|verify``: each VM of a host, for people and for scripts (the fleet's
Ansible module reads the JSON). :mod:`liveupdate.scenario.vms` does the work.

With a machine (``--dir`` or ``$LIVEUPDATE_MACHINE``) the VMs are an emulated machine's and
``verify`` judges them from its RAM (an outside witness); without one they are the VMMs
beside luod's socket (``--socket``, ``$LUOD_SOCKET``, else ``/run/luod/luod.sock``: a real
host) and each VMM runs the checker on its own mapping."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.table import Table

from liveupdate.cli.common import emit, fail
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints
from liveupdate.scenario import vms

machine_option = click.option(
    "--dir", "folder", envvar="LIVEUPDATE_MACHINE", default=None,
    help="An emulated machine's folder; env LIVEUPDATE_MACHINE. Without one: the VMMs "
         "beside luod's socket (a real host).")
socket_option = click.option(
    "--socket", default=None, help="Without a machine: luod's socket, the VMMs' sockets "
    "are beside it [default: $LUOD_SOCKET, else /run/luod/luod.sock].")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _run(socket: str | None) -> str:
    """The VMMs' socket folder on a host without an emulated machine: luod's."""
    return os.path.dirname(os.path.abspath(
        socket or os.environ.get(endpoints.SOCKET_ENV) or endpoints.HOST_SOCKET))


def _blackout(st: dict[str, object]) -> str:
    b = st.get("blackout")
    s = b.get("host_s") if isinstance(b, dict) else None
    return f"{s:.3f} s" if isinstance(s, float) else "-"


@click.group()
def vm() -> None:
    """The VMs of a host (an emulated machine, or the VMMs beside luod on a real one): their
    VMMs' state and the checker's verdict."""


@vm.command()
@click.argument("names", nargs=-1)
@machine_option
@socket_option
@json_option
def status(names: tuple[str, ...], folder: str | None, socket: str | None,
           as_json: bool) -> None:
    """What each VM's VMM says (all VMs, or NAMES): accelerator, memory, step counter,
    paused, restored, the blackout of its last live update (or the downtime of the
    migration that brought it), and where it went if it migrated away. Migration slots are
    listed too; an empty one says so."""
    try:
        got = vms.status(folder, names) if folder else \
            vms.status_in(vms.sockets_in(_run(socket), names))
    except LiveUpdateError as e:
        fail(e)
    t = Table(title=f"VMs of {folder or 'this host'}")
    for col in ("vm", "accel", "memory", "steps", "state", "last blackout"):
        t.add_column(col, justify="left" if col == "vm" else "right")
    for name, st in got.items():
        if st.get("empty"):
            t.add_row(name, "-", "-", "-", "empty slot", "-")
            continue
        state = ("migrated away" if st.get("departed") else "paused" if st["paused"]
                 else "running") + (" (restored)" if st["restored"] else "")
        t.add_row(name, st["accel"], f"{st['memory'] >> 20} MiB", f"{st['steps']:,}", state,
                  _blackout(st))
    if as_json:
        emit(got, True, "")
    else:
        Console().print(t)


@vm.command()
@click.argument("names", nargs=-1)
@machine_option
@socket_option
@json_option
def verify(names: tuple[str, ...], folder: str | None, socket: str | None,
           as_json: bool) -> None:
    """Judge each VM (all, or NAMES): every guest byte against the guest's own counters,
    fill and checksum, the entry count (1: never cold-started), and a restored vCPU's
    registers against the saved state in its preserved state memfd. Pauses each VM at an
    exit for the check.

    Which checker: with a machine (--dir or LIVEUPDATE_MACHINE) the checker runs here,
    reading the emulated machine's RAM -- a witness outside the VMM. Without one (a real
    host, or luod's socket given) each VMM runs the same checker on its own mapping of
    guest memory and its own preserved state ("checked_by": "vmm" in the JSON).

    Exit status: 0 when every VM checked is intact, 1 otherwise.
    """
    try:
        got = vms.verify(folder, names) if folder else \
            vms.verify_by_vmm(_run(socket), names)
    except LiveUpdateError as e:
        fail(e)
    lines = [f"{name}: " + ("intact" if v["ok"] else "BROKEN: " + (v["problem"]
             or v["vcpu_problem"] or f"entered {v['entries']} times"))
             + f", step {v['steps']:,}, {v['pages']:,} pages touched"
             + ("" if v["vcpu_restored"] is None else ", vCPU restored" if v["vcpu_restored"]
                else "") + f" (checked by {v['checked_by']})" for name, v in got.items()]
    emit(got, as_json, "\n".join(lines) or "no VMs")
    sys.exit(0 if all(v["ok"] for v in got.values()) else 1)
