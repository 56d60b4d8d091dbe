"""What one emulated host costs this machine: memory and CPU of its process tree (the machine
process, its kernel and kernel templates, the kernel's userspace: luod, VMMs, slots).

Memory is PSS (``/proc/PID/smaps_rollup``: shared pages split between their users, so the
sum over hosts is what the fleet really takes), plus the resident part of the machine's RAM
memfd (guest memory lives there, not in any process's anonymous memory). CPU is the tree's
user + system time (``/proc/PID/stat`` fields 14 and 15); a rate needs two samples.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from liveupdate import procs
from liveupdate.machine.client import MachineClient

TICK = os.sysconf("SC_CLK_TCK")


def parents() -> dict[int, list[int]]:
    """Every process's children, from one pass over /proc."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        fields = procs.stat_fields(f"/proc/{name}/stat") if name.isdigit() else []
        if len(fields) > 1:
            kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _pss(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) << 10
    return 0


def _cpu(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def host(folder: str, kids: dict[int, list[int]] | None = None) -> dict[str, Any]:
    """The host's processes, PSS bytes, resident RAM bytes and CPU seconds so far."""
    m = MachineClient(folder)
    try:
        st = m.status()
    finally:
        m.close()
    pids = tree(int(st["machine_pid"]), kids if kids is not None else parents())
    return {"processes": len(pids), "pss": sum(_pss(p) for p in pids),
            "ram_resident": int(st["ram_resident"]), "cpu_s": sum(_cpu(p) for p in pids)}
