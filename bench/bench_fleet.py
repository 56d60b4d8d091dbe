"""A rolling live update over the largest fleet this machine carries (issue #27).

Run: .venv/bin/python bench/bench_fleet.py [--hosts 50] [--waves 1,4,15,30] [--forks 5]
     (scripts/venv.sh first: the Ansible collection is installed by it)

Boots N emulated hosts (``luoctl fleet up``: each 2 VMs of 16 MiB under TCG that walk their
memory and idle, one empty migration slot, luod), measures what one host costs while the
fleet idles (PSS of its process tree, resident guest RAM, CPU over 10 s), then runs the
example playbook (``ansible-playbook liveupdate.fleet.rolling_update``) in the given waves
and prints, per wave, the wall time and the blackout distribution, and the VMs lost (the
checker's verdict on every VM after its host's update). Writes the fleet report's PNG
beside the fleet (``--dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from liveupdate.scenario.fleet import hosts, resources, state
from liveupdate.scenario.fleet import report as rep

MiB = 1 << 20


def sample(folder: str) -> dict[str, dict[str, float]]:
    kids = resources.parents()
    return {n: resources.host(h.folder(folder), kids)
            for n, h in state.load(folder).hosts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--waves", default="1,4,15,30")
    ap.add_argument("--forks", type=int, default=5)
    ap.add_argument("--duty", type=float, default=0.002)
    ap.add_argument("--budget", type=float, default=5.0,
                    help="the health gate's blackout budget, seconds (lu_blackout_budget)")
    ap.add_argument("--dir", default="build/bench-fleet")
    args = ap.parse_args()
    con = Console(width=140)
    t0 = time.monotonic()
    hosts.up(args.dir, args.hosts, {"target": "7.2", "duty": args.duty},
             lambda s: None, parallel=4)
    boot_s = time.monotonic() - t0
    a = sample(args.dir)
    time.sleep(10)  # the idle fleet's CPU: two samples 10 s apart
    b = sample(args.dir)
    cpu = [(b[n]["cpu_s"] - a[n]["cpu_s"]) / 10 for n in a]
    pss = [b[n]["pss"] for n in b]
    ram = [b[n]["ram_resident"] for n in b]
    with open("/proc/meminfo") as f:
        avail = next(int(x.split()[1]) << 10 for x in f if x.startswith("MemAvailable"))
    t = Table(title=f"{args.hosts} hosts up in {boot_s:.1f} s: what one host costs (idle)")
    for col in ("figure", "median", "max", "fleet total"):
        t.add_column(col, justify="right")
    t.add_row("processes", f"{statistics.median(b[n]['processes'] for n in b):.0f}", "", "")
    t.add_row("PSS", f"{statistics.median(pss) / MiB:.0f} MiB", f"{max(pss) / MiB:.0f} MiB",
              f"{sum(pss) / MiB:,.0f} MiB")
    t.add_row("guest RAM resident", f"{statistics.median(ram) / MiB:.0f} MiB",
              f"{max(ram) / MiB:.0f} MiB", f"{sum(ram) / MiB:,.0f} MiB")
    t.add_row("CPU (share of one core)", f"{statistics.median(cpu):.1%}", f"{max(cpu):.1%}",
              f"{sum(cpu):.0%} of {os.cpu_count()} cores")
    t.add_row("memory still available", "", "", f"{avail / MiB:,.0f} MiB")
    con.print(t)

    waves = json.dumps([int(w) for w in args.waves.split(",")])
    t1 = time.monotonic()
    play = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
                           "-i", f"{args.dir}/inventory.ini", "-f", str(args.forks),
                           "liveupdate.fleet.rolling_update", "-e",
                           json.dumps({"lu_waves": json.loads(waves),
                                       "lu_blackout_budget": args.budget})],
                          capture_output=True, text=True)
    play_s = time.monotonic() - t1
    r = rep.build(state.load(args.dir))
    rep.plot(r, f"{args.dir}/report.png")
    w = Table(title=f"rollout in waves {waves}, {args.forks} forks: ansible-playbook exit "
              f"{play.returncode}, {play_s:.1f} s")
    for col in ("wave", "hosts", "wall", "VMs", "blackout median", "p90", "max"):  # host clock
        w.add_column(col, justify="right")
    for wave in r["waves"]:
        bl = sorted(v["blackout_s"] for n in wave["hosts"] for v in r["hosts"][n]["vms"]
                    if v["blackout_s"] is not None)
        w.add_row(str(wave["wave"]), str(len(wave["hosts"])), f"{wave['wall_s']:.1f} s",
                  str(len(bl)), f"{statistics.median(bl) * 1e3:.0f} ms" if bl else "-",
                  f"{bl[-(-9 * len(bl) // 10) - 1] * 1e3:.0f} ms" if bl else "-",
                  f"{bl[-1] * 1e3:.0f} ms" if bl else "-")
    con.print(w)
    con.print(f"paths: {r['paths']}; VMs lost: {r['vms_lost']}; report {args.dir}/report.png")
    hosts.down(args.dir)
    sys.exit(0 if play.returncode == 0 and not r["vms_lost"] else 1)


if __name__ == "__main__":
    main()
