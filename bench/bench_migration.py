"""Live migration's downtime next to a live update's blackout, for the same VM in one run.

Run: .venv/bin/python bench/bench_migration.py [--sizes 16M,64M,256M] [--accel tcg|kvm]

Per size, a two-host fleet (both Linux 7.2; host1 has an empty migration slot) whose VM on
host2 runs under load (``--duty 1``: it walks its memory without idling). host2 is
live-updated (the VM's blackout), the VM is then live-migrated to host1 (pre-copy rounds,
stop-and-copy: its downtime, measured by the same code as a blackout), and host1 is
live-updated with the VM in its slot (its blackout again). Each row: the pause by the host
clock and by the guest's TSC, the step counter at the pause and after the resume (it
continues: the guest never restarts), and the checker's verdict from the machine's RAM.
``--accel kvm`` runs the VMs under KVM: the pre-copy rounds track writes with KVM's dirty
log (:mod:`liveupdate.vmm.dirtylog`) instead of TCG's write hook.
"""

from __future__ import annotations

import argparse
import tempfile

from rich.console import Console
from rich.table import Table

from liveupdate.ipc.service import ask
from liveupdate.scenario.fleet import hosts, migrate, ops, state

UNITS = {"M": 20, "G": 30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="16M,64M,256M")
    ap.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    args = ap.parse_args()
    t = Table(title=f"one VM under load ({args.accel.upper()}): live update, live migration, "
              "live update")
    for col in ("VM", "event", "pause (host)", "pause (guest TSC)", "rounds (pages)",
                "steps at pause -> after", "integrity"):
        t.add_column(col, justify="right")
    for size in args.sizes.split(","):
        mem = int(size[:-1]) << UNITS[size[-1].upper()]
        with tempfile.TemporaryDirectory() as folder:
            cfg = {"target": "7.2", "duty": 1.0, "vm_memory": mem, "accel": args.accel,
                   "hosts": {"host1": {"vms": 0, "slots": 1}, "host2": {"vms": 1}}}
            hosts.up(folder, 2, cfg, lambda s: None)
            try:
                run(folder, size, t)
            finally:
                hosts.down(folder)
    Console(width=140).print(t)


def _update(folder: str, host: str, vm: str, size: str, t: Table) -> None:
    m = state.load(folder).host(host)
    where = m.folder(folder)
    assert ops.preflight(where, "7.2")[0]
    ops.live_update(where, m)
    h = ops.health(where, [vm])[vm]
    b = ask(f"{where}/run/vmm-{vm}.sock", "status")["blackout"]
    t.add_row(size, f"live update of {host}", f"{b['host_s'] * 1e3:.0f} ms",
              f"{(b['guest_s'] or 0) * 1e3:.0f} ms", "-",
              f"{b['steps_before']:,} -> {b['steps_after']:,}",
              "intact" if h["ok"] else f"BROKEN {h['problem']}")


def run(folder: str, size: str, t: Table) -> None:
    _update(folder, "host2", "vm0", size, t)
    m = migrate.migrate(folder, "host2", "vm0")
    t.add_row(size, f"migration host2 -> host1 ({m['seconds']:.1f} s)",
              f"{m['downtime_s'] * 1e3:.0f} ms", f"{(m['downtime_guest_s'] or 0) * 1e3:.0f} ms",
              "+".join(str(r) for r in m["rounds"]),
              f"{m['steps_at_pause']:,} -> {m['steps_after_resume']:,}",
              "intact" if m["intact"] else f"BROKEN {m['problem']}")
    _update(folder, "host1", "slot0", size, t)


if __name__ == "__main__":
    main()
