"""``luoctl demo``: boot an emulated machine with VMs and a cache, live-update it, and show
what the update cost and that nothing was lost."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from liveupdate.abi import generations
from liveupdate.abi import image as image_abi
from liveupdate.cli.common import SizeParam, fail
from liveupdate.cli.demo_faults import BY_NAME, FAULTS, Fault, FaultRun, helper_line
from liveupdate.client.update import load_image, run_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient, start
from liveupdate.vmm import guest

CMDLINE = "kho=on liveupdate=on transparent_hugepage_shmem=within_size"
NEGOTIATE = "liveupdate_negotiate=on"
LUO_GENERATIONS = [g for g, r in generations.RELEASES.items() if r.luo != "none"]
IMAGES = {g: image_abi.KernelImage.of(g) for g in LUO_GENERATIONS}
CACHE_KEYS = 64
HEADROOM = 768 << 20  # the kernel's own memory, scratch and the services' beside the VMs


def _services(py: str, vms: int, vm_memory: int, accel: str, cache: bool,
              fault: Fault | None, memory: int) -> str:
    # with a fault armed, a barrier nobody answers is given up quickly
    timeouts = " --prepare-timeout 3 --freeze-timeout 3" if fault else ""
    lines = [f"@restart {py} -m liveupdate.cli.luod --finish-timeout 60{timeouts}"]
    lines += [f"@restart {py} -m liveupdate.vmm vm{i} --memory {vm_memory} --accel {accel}"
              for i in range(vms)]
    if cache:
        lines.append(f"@restart {py} -m liveupdate.userspace.kvcache cache")
    return "\n".join(lines) + "\n" + (helper_line(py, fault, memory) if fault else "")


def _fds(pid: int) -> int | None:
    """Open fds of a machine process (the host's view: the machine's userspace is ours)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


SOAK_FIGURES = ("preserved_pages", "free_pages", "kernel_files", "luod_fds", "machine_rss",
                "ram_resident")


def soak(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Resource figures at update 10 (half-way through runs shorter than 20) and at the last:
    what a leak would grow, once start-up effects have settled. With ``--to``, only updates
    into the same generation as the last are compared (each writes its own structures).
    The kernel, luod and the VMMs are new processes after every kexec; the machine process
    and the emulated RAM live through all of them."""
    last = results[-1]
    same = [r for r in results if r["to"] == last["to"]]  # --to: alternating kernels
    base = same[9 if len(same) >= 20 else max(0, len(same) // 2 - 1)]
    rows = {k: {"at": base["update"], "from": base[k], "to": last[k], "growth": last[k] - base[k]}
            for k in SOAK_FIGURES}
    steps = [[r["vms"][vm]["steps_at_pause"] for r in results] for vm in results[0]["vms"]]
    increasing = all(all(b > a for a, b in itertools.pairwise(s)) for s in steps)
    # no growth of any kernel-side count; the host process's RSS within 5 % (allocator noise)
    leak = any(rows[k]["growth"] > 0 for k in SOAK_FIGURES[:4]) or \
        rows["machine_rss"]["growth"] > rows["machine_rss"]["from"] * 0.05 or \
        rows["ram_resident"]["growth"] > rows["ram_resident"]["from"] * 0.05
    return {"figures": rows, "steps_strictly_increasing": increasing, "leak": leak}


class Demo:
    def __init__(self, folder: str, vms: int, vm_memory: int, machine_memory: int,
                 generation: str, accel: str, cache: bool, say: Any,
                 fault: Fault | None = None, to: str | None = None) -> None:
        self.folder = os.path.abspath(folder)
        self.fault = fault
        self.cache_keys = CACHE_KEYS
        self.vms = [f"vm{i}" for i in range(vms)]
        self.vm_memory, self.memory = vm_memory, machine_memory
        self.generation, self.accel, self.cache = generation, accel, cache
        self.to = to or generation  # update n goes to ``to`` when n is odd, back when even
        self.say = say
        self.run = os.path.join(self.folder, "run")
        self.m: MachineClient | None = None
        self.proc: Any = None

    def sock(self, name: str) -> str:
        return os.path.join(self.run, name)

    def boot(self) -> MachineClient:
        with_old = MachineClient(self.folder)
        try:
            with_old.shutdown()  # a previous demo's machine
        finally:
            with_old.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        disk = Path(self.folder) / "disk"
        (disk / "images").mkdir(parents=True)
        for name, img in IMAGES.items():
            (disk / "images" / f"{name}.img").write_bytes(img.encode())
        (disk / "images" / "junk.img").write_bytes(b"not a kernel image")
        (disk / "services").write_text(_services(sys.executable, len(self.vms),
                                                 self.vm_memory, self.accel, self.cache,
                                                 self.fault, self.memory))
        self.say(f"booting a {self.memory >> 30} GiB machine, Linux {self.generation}")
        cmdline = f"{CMDLINE} {NEGOTIATE}" if self.to != self.generation else CMDLINE
        cmdline = f"{cmdline} {self.fault.cmdline}".strip() if self.fault else cmdline
        self.proc, m = start(self.folder, memory=self.memory, cmdline=cmdline,
                             image=f"images/{self.generation}.img",
                             log=os.path.join(self.folder, "machine.log"))
        self.m = m
        m.booted(120)
        m.wait("luod: LUO .* listening", timeout=120)
        for vm in self.vms:
            m.wait(f"vmm {vm}: .* started", timeout=120)
        self.say("guests running: waiting for each to walk all of its memory once")
        pages = (self.vm_memory - guest.DATA_AT) // guest.PAGE
        deadline = time.monotonic() + 300
        while any(s["steps"] < pages for s in self.statuses().values()):
            if time.monotonic() > deadline:
                raise LiveUpdateError(err=110, msg="the guests made no progress in 300 s")
            time.sleep(0.1)  # a CLI watching guests run
        if self.cache:
            m.wait("kvcache cache: started", timeout=120)
            for i in range(CACHE_KEYS):
                ask(self.sock("kvcache-cache.sock"), "put", key=f"key-{i}", value=f"value-{i}")
        return m

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {vm: ask(self.sock(f"vmm-{vm}.sock"), "status") for vm in self.vms}

    def zero_a_guest_page(self, vm: str) -> int:
        """Break it on purpose: zero a page the guest has counted, behind its back."""
        assert self.m is not None
        gpa = guest.DATA_AT + 7 * guest.PAGE  # inside the data region
        hpa = int(ask(self.sock(f"vmm-{vm}.sock"), "phys", gpa=gpa)["hpa"])
        self.m.ram_write(hpa, bytes(16))
        return hpa

    def update(self, n: int, fault: str) -> dict[str, Any]:
        assert self.m is not None
        before = self.statuses()
        off = self.m.status()["console_bytes"]
        gen = self.to if n % 2 else self.generation
        loaded = load_image(self.sock("luod.sock"), f"images/{gen}.img")
        handover = loaded["handover"]
        self.say(f"update {n} to Linux {gen}: {handover['mode']} handover ("
                 + generations.describe(handover["formats"])
                 + "); prepare, freeze, kexec")
        st, report = run_update(self.sock("luod.sock"),
                                on_phase=lambda ev: self.say(f"  {ev['phase']}"))
        for vm in self.vms:
            self.m.wait(f"vmm {vm}: .* resumed", offset=off, timeout=120)
        if self.cache:
            self.m.wait("kvcache cache: restored", offset=off, timeout=120)
        zeroed = self.zero_a_guest_page(self.vms[0]) if fault == "zero-page" else None
        after = self.statuses()
        vms = {}
        for vm in self.vms:
            chk = ask(self.sock(f"vmm-{vm}.sock"), "verify")
            b = after[vm]["blackout"]
            vms[vm] = {"accel": after[vm]["accel"], "memory": self.vm_memory,
                       "steps_before_update": before[vm]["steps"],
                       "steps_at_pause": b.get("steps_before"),
                       "steps_after_resume": b.get("steps_after"),
                       "resumed": bool(after[vm]["restored"]) and
                       b.get("steps_after", 0) > b.get("steps_before", 0) > 0,
                       "blackout_host_s": b.get("host_s"),
                       "blackout_guest_s": b.get("guest_s"),
                       "integrity": chk["intact"], "problem": chk["problem"],
                       "pages_verified": chk["pages_touched"]}
        cache = None
        if self.cache:
            sock = self.sock("kvcache-cache.sock")
            got = [ask(sock, "get", key=f"key-{i}") for i in range(CACHE_KEYS)]
            cache = {"keys": CACHE_KEYS, "intact": all(
                g["found"] and g["value"] == f"value-{i}" for i, g in enumerate(got))}
        kho = self.m.kho_status()
        mst = self.m.status()
        return {"update": st["update"], "to": gen, "handover": handover,
                "timeline": report.get("timeline", {}),
                "kernel_files": kho["open_files"], "luod_fds": _fds(int(st["pid"])),
                "machine_rss": _rss(int(mst["machine_pid"])),
                "ram_resident": mst["ram_resident"],
                "finish": report.get("finish"), "jump_s": self.m.status()["last_jump_seconds"],
                "vms": vms, "cache": cache, "zeroed_page": zeroed,
                "preserved_pages": kho["out"]["preserved_pages"],
                "free_pages": kho["free_pages"]}

    def faulted_update(self) -> dict[str, Any]:
        """One update with :attr:`fault` injected; what became of everything, observed."""
        assert self.m is not None and self.fault is not None
        run = FaultRun(self, self.fault)
        self.say(f"fault {self.fault.name}: {self.fault.what}")
        run.arm()
        boot_count = self.m.status()["boot_count"]

        def phase(ev: dict[str, Any]) -> None:
            self.say(f"  {ev['phase']}")
            run.during(ev)
        err = run.update(phase)
        if err:
            self.say(f"  the update ended: {err}")
        return run.outcome(boot_count, err)

    def close(self) -> None:
        if self.m is not None:
            self.m.shutdown()
        if self.proc is not None:
            self.proc.wait(60)


PHASE_NAMES = [("start", "prepared", "Normal: luod loads the next kernel, asks to prepare"),
               ("prepared", "frozen", "Prepared: clients preserve, VMs keep running"),
               ("frozen", "reboot", "Frozen: VMs paused, last state written"),
               ("reboot", "updated", "kexec + next kernel boot + luod"),
               ("updated", "normal", "Updated: VMMs and cache restore, FINISH")]


def phases(timeline: dict[str, float]) -> list[dict[str, Any]]:
    base = timeline.get("start", 0.0)
    return [{"phase": label, "start_s": timeline[a] - base, "duration_s": timeline[b] - timeline[a]}
            for a, b, label in PHASE_NAMES if a in timeline and b in timeline]


def render(results: list[dict[str, Any]], verdict: bool) -> None:
    console = Console()
    for r in results:
        h = r["handover"]
        console.print(f"update {r['update']}: to Linux {r['to']}, {h['mode']} handover: "
                      + generations.describe(h["formats"]))
        t = Table(title=f"update {r['update']}: phases (host wall clock)")
        for col in ("phase", "start s", "duration s"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for p in phases(r["timeline"]):
            t.add_row(p["phase"], f"{p['start_s']:.3f}", f"{p['duration_s']:.3f}")
        console.print(t)
        v = Table(title=f"update {r['update']}: VMs")
        for col in ("vm", "accel", "memory", "blackout (host)", "blackout (guest TSC)",
                    "steps at pause -> after", "integrity"):
            v.add_column(col, justify="right")
        for name, vm in r["vms"].items():
            guest_s = vm["blackout_guest_s"]
            v.add_row(name, vm["accel"], f"{vm['memory'] >> 20} MiB",
                      f"{vm['blackout_host_s']:.3f} s",
                      f"{guest_s:.3f} s" if guest_s is not None else "-",
                      f"{vm['steps_at_pause']:,} -> {vm['steps_after_resume']:,}",
                      ("intact" if vm["integrity"] else f"BROKEN: {vm['problem']}")
                      + ("" if vm["resumed"] else " (restarted!)"))
        console.print(v)
        if r["cache"] is not None:
            console.print(f"cache: {r['cache']['keys']} keys "
                          + ("intact" if r["cache"]["intact"] else "LOST"))
        console.print(f"kexec jump (machine): {r['jump_s']:.3f} s; FINISH: {r['finish']}; "
                      f"preserved pages {r['preserved_pages']}, free {r['free_pages']}")
    console.print("[bold green]integrity: intact[/]" if verdict else
                  "[bold red]integrity: FAILED[/]")


def render_soak(s: dict[str, Any], n: int) -> None:
    console = Console()
    first = next(iter(s["figures"].values()))["at"]
    t = Table(title=f"resources after update {first} and after update {n}")
    for col in ("figure", f"update {first}", f"update {n}", "growth"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for name, f in s["figures"].items():
        t.add_row(name, f"{f['from']:,}", f"{f['to']:,}", f"{f['growth']:+,}")
    console.print(t)
    console.print("guest step counters " + ("strictly increasing across every update"
                                            if s["steps_strictly_increasing"] else
                                            "[bold red]NOT increasing: a guest restarted[/]"))
    console.print("[bold red]resources GREW (leak)[/]" if s["leak"] else
                  "no growth: preserved and free pages, kernel files and luod fds equal, "
                  "machine RSS and resident RAM within 5 %")


def render_fault(o: dict[str, Any]) -> None:
    console = Console()
    t = Table(title=f"fault {o['fault']}: {o['what']}")
    for col in ("workload", "became", "how"):
        t.add_column(col)
    for name, w in o["workloads"].items():
        t.add_row(name, w["state"], w["why"])
    console.print(t)
    console.print(f"outcome: {o['outcome']} (defined: {o['expected']}); luod "
                  f"{o['luod_phase']}" + (f", says: {o['why']}" if o["why"] else ""))
    console.print("[bold green]as defined, nothing lost[/]" if o["as_expected"] else
                  f"[bold red]NOT as defined; lost: {', '.join(o['lost']) or 'nothing'}[/]")


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results[-1]
    rows = [(p["phase"], p["start_s"], p["duration_s"]) for p in phases(r["timeline"])]
    pause = r["timeline"].get("frozen", 0.0) - r["timeline"].get("start", 0.0)
    rows += [(f"{name} blackout (host clock)", pause, vm["blackout_host_s"])
             for name, vm in r["vms"].items()]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    for i, (label, start_s, dur) in enumerate(rows):
        ax.barh(i, dur, left=start_s, color="tab:red" if "blackout" in label else "tab:blue")
        ax.text(start_s + dur, i, f" {dur:.3f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the update started")
    ax.set_title(f"live update {r['update']}: phases and VM blackout")
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
@click.option("--fault", type=click.Choice(["none", "zero-page", *(f.name for f in FAULTS)]),
              default="none", metavar="FAULT",
              help="Break it on purpose. zero-page: zero a guest page after the update; the "
                   "guest's checksum must catch it and the demo exit non-zero. "
                   "TARGET@PHASE (kill-client|kill-vmm@normal|prepare|freeze|restore, "
                   "kill-luod@normal|prepared|frozen|updated, no-ack@prepare|freeze, "
                   "enomem@prepare, fds-kernel@prepare, fds-luod@normal, "
                   "bad-image@normal, incompatible-image@normal, freeze-fails@reboot (v3), "
                   "power-loss@reboot|boot|restore): inject that fault into one update and "
                   "report what became of every workload; exit 0 when the outcome is the "
                   "defined one and nothing was lost. docs/reliability.md lists them all.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG timeline of the last update: phases and each VM's blackout.")
def demo(folder: str, vms: int, vm_memory: int, machine_memory: int, generation: str,
         to: str | None, accel: str, updates: int, cache: bool, fault: str, as_json: bool,
         plot_path: str | None) -> None:
    """Boot an emulated machine with VMs (and a cache), let the guests run, live-update it
    to a new kernel image, and report: a phase timeline, each VM's blackout measured by the
    host clock and by the guest's own timestamps, and the integrity verdict (every guest page
    checked against the guest's own counters and checksum; the cache's keys read back).

    Exit status: 0 when everything came back intact, 1 otherwise (or on any error).
    """
    if vms * vm_memory + HEADROOM > machine_memory:
        fail(f"{vms} VMs of {vm_memory >> 20} MiB do not fit a {machine_memory >> 20} MiB "
             f"machine (leave {HEADROOM >> 20} MiB for the kernel and services)")
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

    d = Demo(folder, vms, vm_memory, machine_memory, generation, accel, cache, say, plan, to)
    results: list[dict[str, Any]] = []
    if plan is not None:
        try:
            d.boot()
            outcome = d.faulted_update()
        except LiveUpdateError as e:
            d.close()
            fail(e)
        d.close()
        if as_json:
            click.echo(json.dumps({"fault": outcome}, indent=2))
        else:
            render_fault(outcome)
        sys.exit(0 if outcome["as_expected"] else 1)
    try:
        d.boot()
        for n in range(1, updates + 1):
            results.append(d.update(n, fault if n == updates else "none"))
    except LiveUpdateError as e:
        d.close()
        fail(e)
    d.close()
    ok = all(vm["integrity"] and vm["resumed"] for r in results for vm in r["vms"].values()) \
        and all(r["cache"] is None or r["cache"]["intact"] for r in results)
    # a kernel's own handover structures differ by generation: compare like with like
    leak = any(len({(r["preserved_pages"], r["free_pages"]) for r in results
                    if r["to"] == gen}) > 1 for gen in {r["to"] for r in results})
    soaked = soak(results) if updates > 1 else None
    if soaked is not None:
        leak = leak or soaked["leak"] or not soaked["steps_strictly_increasing"]
    if plot_path and results:
        plot(results, plot_path)
    if as_json:
        click.echo(json.dumps({"integrity": ok, "leak": leak, "soak": soaked,
                               "updates": results}, indent=2))
    else:
        render(results[-3:], ok)  # the last few in full; the soak table covers all
        if soaked is not None:
            render_soak(soaked, len(results))
    sys.exit(0 if ok and not leak else 1)
