"""``luoctl demo``: boot an emulated machine with VMs and a cache, live-update it, and show
what the update cost and that nothing was lost. The run itself is
:mod:`liveupdate.scenario.run`; this parses the options and renders its report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from liveupdate.abi import generations
from liveupdate.cli.common import SizeParam, fail
from liveupdate.errors import LiveUpdateError
from liveupdate.scenario import run
from liveupdate.scenario.damage import DAMAGE, Damage
from liveupdate.scenario.demo import HEADROOM, IMAGES, LUO_GENERATIONS, Demo
from liveupdate.scenario.faults import BY_NAME, FAULTS
from liveupdate.scenario.report import DemoReport, FaultOutcome, SoakResult, UpdateResult


def render(results: list[UpdateResult], verdict: bool) -> None:
    console = Console()
    for r in results:
        h = r.handover
        console.print(f"update {r.update}: to Linux {r.to}, {h['mode']} handover: "
                      + generations.describe(h["formats"]))
        t = Table(title=f"update {r.update}: phases (host wall clock)")
        for col in ("phase", "start s", "duration s"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for p in r.phases:
            t.add_row(p.phase, f"{p.start_s:.3f}", f"{p.duration_s:.3f}")
        console.print(t)
        v = Table(title=f"update {r.update}: VMs")
        for col in ("vm", "accel", "memory", "blackout (host)", "blackout (guest TSC)",
                    "steps at pause -> after", "integrity"):
            v.add_column(col, justify="right")
        for name, vm in r.vms.items():
            guest_s = vm.blackout_guest_s
            v.add_row(name, vm.accel, f"{vm.memory >> 20} MiB",
                      f"{vm.blackout_host_s:.3f} s",
                      f"{guest_s:.3f} s" if guest_s is not None else "-",
                      f"{vm.steps_at_pause:,} -> {vm.steps_after_resume:,}",
                      ("intact" if vm.integrity else f"BROKEN: {vm.problem}")
                      + ("" if vm.resumed else " (restarted!)")
                      + ("" if vm.vcpu_restored else f" vCPU NOT RESTORED: {vm.vcpu_problem}"))
        console.print(v)
        for name, vm in r.vms.items():
            if vm.blackout_parts:
                console.print(f"{name} blackout: " + ", ".join(
                    f"{part} {s * 1000:.0f} ms" for part, s in vm.blackout_parts.items()))
        if r.cache is not None:
            console.print(f"cache: {r.cache.keys} keys "
                          + ("intact" if r.cache.intact else "LOST"))
        if r.jump_s is not None:  # the emulated machine's figures (none on a real kernel)
            console.print(f"kexec jump (machine): {r.jump_s:.3f} s; FINISH: {r.finish}; "
                          f"preserved pages {r.preserved_pages}, free {r.free_pages}")
        else:
            console.print(f"FINISH: {r.finish}")
    console.print("[bold green]integrity: intact[/]" if verdict else
                  "[bold red]integrity: FAILED[/]")


def render_soak(s: SoakResult, n: int) -> None:
    console = Console()
    first = next(iter(s.figures.values())).at
    t = Table(title=f"resources after update {first} and after update {n}")
    for col in ("figure", f"update {first}", f"update {n}", "growth"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for name, f in s.figures.items():
        t.add_row(name, f"{f.start:,}", f"{f.end:,}", f"{f.growth:+,}")
    console.print(t)
    console.print("guest step counters " + ("strictly increasing across every update"
                                            if s.steps_strictly_increasing else
                                            "[bold red]NOT increasing: a guest restarted[/]"))
    console.print("[bold red]resources GREW (leak)[/]" if s.leak else
                  "no growth: preserved and free pages, kernel files and luod fds equal, "
                  "machine RSS and resident RAM within 5 %")


def render_fault(o: FaultOutcome) -> None:
    console = Console()
    t = Table(title=f"fault {o.fault}: {o.what}")
    for col in ("workload", "became", "how"):
        t.add_column(col)
    for name, w in o.workloads.items():
        t.add_row(name, w.state, w.why)
    console.print(t)
    console.print(f"outcome: {o.outcome} (defined: {o.expected}); luod "
                  f"{o.luod_phase}" + (f", says: {o.why}" if o.why else ""))
    console.print("[bold green]as defined, nothing lost[/]" if o.as_expected else
                  f"[bold red]NOT as defined; lost: {', '.join(o.lost) or 'nothing'}[/]")


def plot(results: list[UpdateResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results[-1]
    rows = [(p.phase, p.start_s, p.duration_s) for p in r.phases]
    pause = r.timeline.get("frozen", 0.0) - r.timeline.get("start", 0.0)
    rows += [(f"{name} blackout (host clock)", pause, vm.blackout_host_s or 0.0)
             for name, vm in r.vms.items()]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    for i, (label, start_s, dur) in enumerate(rows):
        ax.barh(i, dur, left=start_s, color="tab:red" if "blackout" in label else "tab:blue")
        ax.text(start_s + dur, i, f" {dur:.3f} s", va="center", fontsize=8)
    colors = [f"C{i}" for i in range(10)]  # matplotlib's default cycle
    for i, vm in enumerate(r.vms.values(), len(r.phases)):  # the blackout rows, in parts
        at = (vm.blackout_wall_ns[0] / 1e9 - r.timeline.get("start", 0.0)) \
            if vm.blackout_wall_ns else pause
        for j, (part, dur) in enumerate((vm.blackout_parts or {}).items()):
            ax.barh(i, dur, left=at, height=0.4, color=colors[j % len(colors)],
                    label=part if i == len(r.phases) else None)
            at += dur
    if any(vm.blackout_parts for vm in r.vms.values()):
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the update started")
    ax.set_title(f"live update {r.update}: phases and VM blackout")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@click.option("--dir", "folder", default=".demo/machine", show_default=True,
              help="The demo machine's folder (replaced).")
@click.option("--vms", type=click.IntRange(0, 16), default=2, show_default=True)
@click.option("--vm-memory", type=SizeParam(), default="1G", show_default=True)
@click.option("--machine-memory", type=SizeParam(), default="4G", show_default=True)
@click.option("--from", "--generation", "generation", type=click.Choice(LUO_GENERATIONS),
              default="6.19", show_default=True,
              help="The kernel generation the machine boots (its KHO, LUO and memfd formats "
                   "and uAPI; docs/generations.md).")
@click.option("--to", "to", type=click.Choice(LUO_GENERATIONS), default=None,
              help="The generation to update to [default: --from]. When it differs, both "
                   "kernels run with liveupdate_negotiate=on and agree on formats (7.2 -> "
                   "6.19 is a rollback, 6.19 -> 7.2 a roll-forward); with --updates N, odd "
                   "updates go to --to and even ones back to --from.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True, help="vCPU accelerator, as QEMU's -accel kvm:tcg.")
@click.option("--updates", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Live updates in a row; with more than one, a soak report compares the "
                   "resources after update 10 (half-way for fewer than 20) with the last and "
                   "fails on growth. scripts/soak runs 100.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Also run the key-value cache service.")
@click.option("--spares/--no-spares", default=True, show_default=True,
              help="Pre-imported userspace spares that each next kernel adopts as luod, the "
                   "VMMs and the cache (--no-spares: lu.spares=0, a Python start each, inside "
                   "the VMs' pause).")
@click.option("--fault", type=click.Choice(["none", *DAMAGE, *(f.name for f in FAULTS)]),
              default="none", metavar="FAULT",
              help="Break it on purpose. flip-byte (one random byte of a random guest page), "
                   "zero-tail (a page zeroed from a random byte on), swap-pages (two pages "
                   "trade places): done to vm0 after the update; cold-vcpu: vm0's VMM throws "
                   "its saved vCPU state away. The checker must catch each and the demo exit "
                   "non-zero. "
                   "TARGET@PHASE (kill-client|kill-vmm@normal|prepare|freeze|restore, "
                   "kill-luod@normal|prepared|frozen|updated, no-ack@prepare|freeze, "
                   "enomem@prepare, fds-kernel@prepare, fds-luod@normal, "
                   "bad-image@normal, incompatible-image@normal, freeze-fails@reboot (v3), "
                   "power-loss@reboot|boot|restore): inject that fault into one update and "
                   "report what became of every workload; exit 0 when the outcome is the "
                   "defined one and nothing was lost. docs/reliability.md lists them all.")
@click.option("--vm-hugepages", type=click.Choice(["2M", "1G"]), default=None,
              help="Guest memory on hugetlb pages (MFD_HUGETLB) from pools sized on the "
                   "kernel command line; preserved as huge-memfd-v1 (--from 7.3+posted).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG timeline of the last update: phases and each VM's blackout.")
@click.option("--real", is_flag=True,
              help="Run the scenario on the real Linux 7.3 in QEMU (built from Debian's "
                   "source, or the cached image: luoctl realkernel build) -- one VM of 32 "
                   "MiB under TCG and the cache -- and the same scenario on an emulated "
                   "machine beside it: both reports, and their phases compared. Minutes.")
@click.option("--real-out", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".realkernel/demo"), show_default=True,
              help="With --real: the guest's results, services' logs and console.")
@click.option("--echo", is_flag=True, help="With --real: show the guest's whole console.")
@click.option("--devices", "devices_mode", type=click.Choice(["both", "continuous", "posted"]),
              default=None, help="Passthrough devices instead (issue #25): --vms VMs (default "
              "1 here) with a NIC each on Linux 7.3+posted, live-updated once per mode "
              "(continuous: our deviation, DMA never stops; posted: the device reset at "
              "freeze); per VM the packets delivered during the blackout, drops, IOMMU "
              "faults and DMA writes outside preserved memory. --plot draws the packets.")
@click.option("--ring", type=click.IntRange(16, 65536), default=4096, show_default=True,
              help="With --devices: the guests' receive ring entries (a power of two).")
def demo(folder: str, vms: int, vm_memory: int, machine_memory: int, generation: str,
         to: str | None, accel: str, updates: int, cache: bool, spares: bool, fault: str,
         as_json: bool, plot_path: str | None, real: bool, real_out: Path, echo: bool,
         devices_mode: str | None, ring: int, vm_hugepages: str | None) -> None:
    """Boot an emulated machine with VMs (and a cache), let the guests run, live-update it
    to a new kernel image, and report: a phase timeline, each VM's blackout measured by the
    host clock and by the guest's own timestamps, and the integrity verdict (every guest page
    checked against the guest's own counters and checksum; the cache's keys read back).

    Exit status: 0 when everything came back intact, 1 otherwise (or on any error).
    """
    if vms * vm_memory + HEADROOM > machine_memory:
        fail(f"{vms} VMs of {vm_memory >> 20} MiB do not fit a {machine_memory >> 20} MiB "
             f"machine (leave {HEADROOM >> 20} MiB for the kernel and services)")
    if vm_hugepages and any("huge-memfd" not in IMAGES[g].native()
                            for g in (generation, to or generation)):
        fail("--vm-hugepages: only 7.3+posted preserves a hugetlb memfd (the hugetlb RFC); "
             "7.3 answers PRESERVE_FD with ENOENT")
    plan = BY_NAME.get(fault)
    if plan is not None and plan.generation and plan.generation != generation:
        fail(f"--fault {fault} needs --generation {plan.generation}")
    if plan is not None and updates != 1:
        fail(f"--fault {fault} is injected into one update: leave --updates at 1")
    if plan is not None and to not in (None, generation):
        fail(f"--fault {fault} runs between two kernels of one generation: leave out --to")
    err = Console(stderr=True)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not as_json:
            err.print(f"[dim]{time.monotonic() - t0:7.2f}s[/] {msg}")

    if devices_mode is not None:
        from liveupdate.cli import demo_devices

        given = click.get_current_context().get_parameter_source("vms")
        n = vms if given == click.core.ParameterSource.COMMANDLINE else 1
        demo_devices.run(f"{folder}-dev", devices_mode, n, ring,
                         "tcg" if accel == "auto" else accel, as_json, plot_path, say)

    if real:
        if fault != "none" or updates != 1 or to is not None:
            fail("--real runs the demo's one update: leave out --fault, --updates and --to")
        from liveupdate.cli.demo_real import run_real

        run_real(real_out, as_json, echo, say)

    if fault in DAMAGE and vms < 1:
        fail(f"--fault {fault} breaks vm0: run at least one VM")
    d = Demo(folder, vms, vm_memory, machine_memory, generation, accel, cache, say, plan, to,
             damage=(Damage(fault),) if fault in DAMAGE else (), hugepages=vm_hugepages or "",
             spares=spares)
    try:
        report: DemoReport = run.faulted(d) if plan is not None else \
            run.updates(d, updates, fault)
    except LiveUpdateError as e:
        fail(e)
    if plot_path and report.updates:
        plot(report.updates, plot_path)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif report.fault is not None:
        render_fault(report.fault)
    else:
        render(report.updates[-3:], report.integrity)  # the last few in full; the soak
        if report.soak is not None:                     # table covers all
            render_soak(report.soak, len(report.updates))
        for c in report.checks:  # blackout and zero copy, against the machine's records
            if c.group == "witness" and not c.passed:
                click.echo(f"{c.name}: FAILED: {c.detail}")
    sys.exit(0 if report.ok else 1)
