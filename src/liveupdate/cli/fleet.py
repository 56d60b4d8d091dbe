"""``luoctl fleet``: many emulated hosts on this machine, a rolling live update over them
(driven by the Ansible collection in ``ansible/``, or by hand), live migration between them,
and the fleet report. :mod:`liveupdate.scenario.fleet` does the work."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from liveupdate.cli.common import emit, fail
from liveupdate.errors import LiveUpdateError

fleet_option = click.option("--dir", "folder", envvar="LIVEUPDATE_FLEET", default=".fleet",
                            show_default=True, help="The fleet's folder; env LIVEUPDATE_FLEET.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def fleet() -> None:
    """Many emulated hosts with VMs: boot them, roll a live update over them in waves
    (ansible-playbook with the liveupdate.fleet collection; README "Fleets"), migrate VMs
    between them, report."""


@fleet.command()
@click.argument("n", type=click.IntRange(1, 200))
@fleet_option
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help='JSON: {"target": "7.2", "vms": 2, "vm_memory": 16777216, '
              '"slots": 1, "duty": 0.01, "accel": "tcg", "hosts": {"host2": {"generation": "6.19", '
              '"assigned": ["vm1"], "plant": {"vm0": "cold-start"}, "slots": 2}}} -- the '
              "fleet's target kernel, each host's defaults, and hosts made different.")
@click.option("--parallel", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Hosts booted at a time.")
@json_option
def up(n: int, folder: str, config_path: str | None, parallel: int, as_json: bool) -> None:
    """Boot N emulated hosts (host1..hostN), each with luod, its VMs (guests under TCG, or
    KVM with "accel": "kvm", that walk their memory, then idle) and empty migration slots,
    and write the fleet's state (fleet.json) and Ansible inventory (inventory.ini).
    Replaces a fleet in the folder."""
    from liveupdate.scenario.fleet import hosts

    config: dict[str, Any] = {}
    if config_path:
        with open(config_path) as f:
            config = json.load(f)
    t0 = time.monotonic()
    say = (lambda s: None) if as_json else (lambda s: click.echo(
        f"{time.monotonic() - t0:7.2f}s {s}", err=True))
    try:
        fl = hosts.up(folder, n, config, say, parallel)
    except LiveUpdateError as e:
        fail(e)
    emit({"hosts": list(fl.hosts), "inventory": f"{fl.folder}/inventory.ini",
          "seconds": time.monotonic() - t0}, as_json,
         f"{n} hosts up in {time.monotonic() - t0:.1f} s; inventory {fl.folder}/inventory.ini")


@fleet.command()
@fleet_option
def down(folder: str) -> None:
    """Power every host of the fleet off for good."""
    from liveupdate.scenario.fleet import hosts

    click.echo(f"{hosts.down(folder)} hosts powered off")


@fleet.command()
@fleet_option
@click.option("--resources", is_flag=True, help="Also each host's processes, memory (PSS) "
              "and CPU seconds so far.")
@json_option
def status(folder: str, resources: bool, as_json: bool) -> None:
    """Each host: its kernel generation, status in the rollout, VMs (where migrated VMs
    went), free slots."""
    from liveupdate.scenario.fleet import resources as res
    from liveupdate.scenario.fleet import state

    try:
        fl = state.load(folder)
        kids = res.parents() if resources else {}
        out: dict[str, dict[str, Any]] = {n: {"generation": h.generation, "status": h.status,
                   "vms": [v.origin or v.name for v in h.vms], "free_slots": h.free_slots(),
                   **({"resources": res.host(h.folder(fl.folder), kids)} if resources else {})}
               for n, h in fl.hosts.items()}
    except LiveUpdateError as e:
        fail(e)
    lines = [f"{n:8} {h['generation']:5} {h['status']:9} vms: {', '.join(h['vms']) or '-'}; "
             f"free slots {len(h['free_slots'])}"
             + (f"; {h['resources']['pss'] >> 20} MiB, {h['resources']['cpu_s']:.1f} CPU s"
                if resources else "") for n, h in out.items()]
    emit(out, as_json, "\n".join(lines))


@fleet.command("host-update")
@click.argument("host")
@fleet_option
@click.option("--blackout-budget", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds a VM may be paused (blackout, or migration downtime).")
@click.option("--assigned", type=click.Choice(["evict", "skip"]), default="evict",
              show_default=True, help="When the host must be evacuated and a VM has an "
              "assigned device (it cannot migrate): evict it with notice, or skip the host.")
@click.option("--batch", default="", help="The hosts of this wave (Ansible's "
              "ansible_play_batch, comma-separated): the report groups waves by it.")
@json_option
def host_update(host: str, folder: str, blackout_budget: float, assigned: str, batch: str,
                as_json: bool) -> None:
    """Update HOST to the fleet's target kernel: pre-flight; a live update when it accepts;
    when it refuses, its VMs migrated to a host with room (or evicted) and a cold reboot
    into the new image; then the health gate (every VM intact, its step counter rising, its
    blackout within budget). Records the result for the fleet report.

    Exit status: 0 when the host is updated (or skipped by the policy), 1 otherwise.
    """
    from liveupdate.scenario.fleet import rollout

    try:
        r = rollout.host_update(folder, host, budget=blackout_budget, assigned=assigned,
                                batch=batch)
    except LiveUpdateError as e:
        fail(e)
    emit(r, as_json, f"{host}: {r['path']} ({r['status']}): {r['why']}")
    sys.exit(0 if r["ok"] else 1)


@fleet.command()
@click.argument("host")
@click.argument("vm")
@fleet_option
@json_option
def migrate(host: str, vm: str, folder: str, as_json: bool) -> None:
    """Live-migrate VM off HOST to a host with room (a free slot on a host running the
    fleet's target): pre-copy with write tracking while the guest runs (under TCG a write
    hook, under KVM its dirty log), stop-and-copy; its downtime and the checker's verdict
    on the destination."""
    from liveupdate.scenario.fleet import migrate as mig

    try:
        r = mig.migrate(folder, host, vm)
    except LiveUpdateError as e:
        fail(e)
    emit(r, as_json, f"{host}/{vm} -> {r['to']} ({r['slot']}): {len(r['rounds'])} rounds, "
         f"{r['pages_sent']} pages, downtime {r['downtime_s']:.3f} s, "
         + ("intact" if r["intact"] else f"BROKEN: {r['problem']}"))
    sys.exit(0 if r["intact"] else 1)


@fleet.command()
@fleet_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of the blackout distribution per wave.")
@json_option
def report(folder: str, plot_path: str | None, as_json: bool) -> None:
    """The rollout per wave and host: path taken (live update, migrate + reboot, evicted
    VMs, failed, skipped by the halt), each VM's blackout or migration downtime, integrity;
    the waves' wall times. Exit status 1 when a VM was lost (found not intact)."""
    from liveupdate.scenario.fleet import report as rep
    from liveupdate.scenario.fleet import state

    try:
        r = rep.build(state.load(folder))
    except LiveUpdateError as e:
        fail(e)
    if plot_path:
        rep.plot(r, plot_path)
    if as_json:
        emit(r, True, "")
    else:
        _render(r)
    sys.exit(1 if r["vms_lost"] else 0)


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.0f} ms"


def _render(r: dict[str, Any]) -> None:
    con = Console(width=160)
    t = Table(title=f"rollout to {r['target']}" + (" -- HALTED" if r["halted"] else ""))
    for col in ("wave", "host", "path", "VMs (blackout / downtime, integrity)", "why"):
        t.add_column(col)
    for name, h in sorted(r["hosts"].items(), key=lambda kv: (kv[1]["wave"] or 99, kv[0])):
        vms = "; ".join(f"{v['vm']} {v['how']} {_ms(v['blackout_s'])} "
                        + ("ok" if v["intact"] else "BROKEN") for v in h["vms"])
        t.add_row(str(h["wave"] or "-"), name, h["path"], vms or "-", h["why"][:80])
    con.print(t)
    for w in r["waves"]:
        con.print(f"wave {w['wave']}: {len(w['hosts'])} hosts in {w['wall_s']:.1f} s, "
                  f"blackout median {_ms(w['blackout_median_s'])}, "
                  f"max {_ms(w['blackout_max_s'])}")
    con.print(f"VMs lost: {r['vms_lost']}")
