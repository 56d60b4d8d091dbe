"""``luoctl demo --real``: the demo's scenario on the real Linux 7.3 in QEMU, with the
emulated run of the same scenario beside it.

Both runs are the steps of :mod:`liveupdate.scenario.host` -- one VM of 32 MiB under TCG, the
cache with its keys, one live update to the same kernel -- on a real kernel
(:mod:`liveupdate.realkernel.demo_run`) and on an emulated machine of the real kernel's
generation. Each is reported as the emulated demo reports (phases, VMs, integrity); then the
phases side by side. TCG inside QEMU is slow: absolute times are not comparable, the phases
and their order are, and the comparison says whether they match.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from liveupdate.cli.common import fail
from liveupdate.scenario.report import Check, DemoReport, UpdateResult

VM_MEMORY, MACHINE_MEMORY = 32 << 20, 1 << 30


def compare(emulated: UpdateResult, real: UpdateResult) -> dict[str, Any]:
    """The two runs' phases side by side, and whether they are the same phases in the same
    order (luod's timeline points, each reached once, in order)."""
    e, r = emulated.phases, real.phases
    rows = [{"phase": p.phase, "emulated_start_s": p.start_s, "emulated_s": p.duration_s,
             "real_start_s": q.start_s if q else None, "real_s": q.duration_s if q else None}
            for p, q in zip(e, [*r, *[None] * max(0, len(e) - len(r))], strict=False)]
    same = [p.phase for p in e] == [p.phase for p in r] and len(e) > 0
    return {"phases": rows, "same_phases_in_order": same}


def render_compare(cmp: dict[str, Any], emulated: UpdateResult, real: UpdateResult) -> None:
    t = Table(title="the same scenario: emulated machine vs real Linux "
                    f"{real.to} in QEMU (TCG; absolute times are not comparable)")
    for col in ("phase", "emulated start s", "emulated s", "real start s", "real s"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for row in cmp["phases"]:
        t.add_row(row["phase"], f"{row['emulated_start_s']:.3f}", f"{row['emulated_s']:.3f}",
                  *(f"{row[k]:.3f}" if row[k] is not None else "-"
                    for k in ("real_start_s", "real_s")))
    console = Console()
    console.print(t)
    for name in emulated.vms:
        ev, rv = emulated.vms[name], real.vms.get(name)
        if rv is not None:
            console.print(f"{name} blackout: emulated {ev.blackout_host_s:.3f} s, real "
                          f"{rv.blackout_host_s:.3f} s (host CLOCK_REALTIME; guest TSC "
                          f"{rv.blackout_guest_s or 0:.3f} s)")
    console.print("phases and their order: " + ("[bold green]the same[/]"
                                                if cmp["same_phases_in_order"] else
                                                "[bold red]DIFFERENT[/]"))


def run_real(out: Path, as_json: bool, echo: bool, say: Any) -> None:
    """Build (or take the cached) image, run the scenario on it, then emulated; report."""
    from liveupdate.cli.demo import render
    from liveupdate.client.generation import kernel_generation
    from liveupdate.errors import LiveUpdateError
    from liveupdate.realkernel.build import build
    from liveupdate.realkernel.demo_run import real_update
    from liveupdate.scenario import run
    from liveupdate.scenario.demo import Demo

    try:
        image = build()
        real, real_checks, _ = real_update(image, out, echo=echo)
        say(f"the same scenario on an emulated machine, Linux {real.to}")
        with tempfile.TemporaryDirectory(prefix="lu-demo-real-") as tmp:
            d = Demo(tmp + "/m", 1, VM_MEMORY, MACHINE_MEMORY,
                     kernel_generation(image.release), "tcg", True, say)
            emulated = run.updates(d, 1)
    except (LiveUpdateError, OSError) as e:
        fail(e)
    checks = real_checks + [dataclasses.replace(c, name=f"emulated: {c.name}")
                            for c in emulated.checks]
    cmp = compare(emulated.updates[0], real)
    checks.append(Check("the same phases in the same order", "witness",
                        cmp["same_phases_in_order"],
                        " -> ".join(p["phase"] for p in cmp["phases"])))
    report = DemoReport(updates=[real], checks=checks)
    if as_json:
        click.echo(json.dumps({"real": {**report.to_json(), "release": image.release},
                               "emulated": emulated.to_json(), "comparison": cmp,
                               "ok": report.ok}, indent=2))
    else:
        Console().print(f"[bold]real Linux {image.release} in QEMU[/]")
        render([real], all(c.passed for c in real_checks if c.group == "integrity"))
        Console().print("[bold]emulated machine, the same scenario[/]")
        render(emulated.updates, emulated.integrity)
        render_compare(cmp, emulated.updates[0], real)
        for c in checks:
            if not c.passed:
                click.echo(f"{c.name}: FAILED: {c.detail}")
    sys.exit(0 if report.ok else 1)
