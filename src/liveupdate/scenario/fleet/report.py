"""The fleet report (``luoctl fleet report``): per wave and host, the path it took, each VM's
blackout or migration downtime, integrity; the waves' wall times; a PNG of the blackout
distribution per wave.

Waves are recovered from what each host recorded: Ansible's ``ansible_play_batch`` (the
hosts of the current ``serial`` batch) is passed to every host's module call, so hosts with
the same batch were one wave, in the order they started. A host with no result was never
reached: "skipped by the halt" when a host failed (``max_fail_percentage`` stopped the
play), else "not reached".
"""

from __future__ import annotations

from typing import Any

from liveupdate.scenario.fleet.state import Fleet


def waves(fleet: Fleet) -> list[list[str]]:
    done = sorted((h.result for h in fleet.hosts.values() if h.result),
                  key=lambda r: r["started"])
    out: list[list[str]] = []
    seen: dict[str, int] = {}
    for r in done:
        key = r.get("batch") or r["host"]
        if key not in seen:
            seen[key] = len(out)
            out.append([])
        out[seen[key]].append(r["host"])
    return out


def _vm_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"vm": n, "how": "live update" if v["restored"] else "rebooted",
             "blackout_s": v["blackout_s"] if v["restored"] else None,
             "intact": v["ok"], "steps_rising": v["steps_rising"]}
            for n, v in r.get("vms", {}).items()]
    rows += [{"vm": m["vm"], "how": "evicted" if m.get("evicted") else f"migrated to {m['to']}",
              "blackout_s": None if m.get("evicted") else m["downtime_s"],
              "intact": m["intact"], "steps_rising": None} for m in r.get("moved", [])]
    return rows


def build(fleet: Fleet) -> dict[str, Any]:
    ws = waves(fleet)
    halted = any(h.status == "failed" for h in fleet.hosts.values())
    hosts: dict[str, Any] = {}
    for i, wave in enumerate(ws, 1):
        for name in wave:
            r = fleet.hosts[name].result
            hosts[name] = {"wave": i, "path": r["path"], "status": r["status"],
                           "why": r["why"], "release_before": r["release_before"],
                           "release_after": r["release_after"], "seconds": r["seconds"],
                           "vms": _vm_rows(r)}
    for name, h in fleet.hosts.items():
        if name not in hosts:
            hosts[name] = {"wave": None, "path": "skipped by the halt" if halted
                           else "not reached", "status": h.status, "why": "", "vms": []}
    wall = []
    for i, wave in enumerate(ws, 1):
        rs = [fleet.hosts[n].result for n in wave]
        start = min(r["started"] for r in rs)
        end = max(r["started"] + r["seconds"] for r in rs)
        bl = [v["blackout_s"] for n in wave for v in hosts[n]["vms"]
              if v["blackout_s"] is not None]
        wall.append({"wave": i, "hosts": wave, "wall_s": end - start,
                     "blackouts": len(bl), "blackout_max_s": max(bl, default=None),
                     "blackout_median_s": sorted(bl)[len(bl) // 2] if bl else None})
    vms_lost = sum(1 for h in hosts.values() for v in h["vms"] if v["intact"] is False)
    return {"target": fleet.target, "halted": halted, "waves": wall, "hosts": hosts,
            "vms_lost": vms_lost,
            "paths": {p: sum(1 for h in hosts.values() if h["path"] == p)
                      for p in sorted({h["path"] for h in hosts.values()})}}


def plot(report: dict[str, Any], path: str) -> None:
    """The blackout (and migration downtime) distribution per wave, one strip per wave."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = []
    for w in report["waves"]:
        i = w["wave"]
        for name in w["hosts"]:
            for v in report["hosts"][name]["vms"]:
                if v["blackout_s"] is None:
                    continue
                migrated = v["how"].startswith("migrated")
                ax.scatter(i + (0.15 if migrated else -0.15), v["blackout_s"] * 1e3,
                           marker="^" if migrated else "o", s=18,
                           color="tab:orange" if migrated else "tab:blue", alpha=0.7)
        labels.append(f"wave {i}\n{len(w['hosts'])} hosts, {w['wall_s']:.1f} s")
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylabel("ms (o: live-update blackout, ^: migration downtime)")
    ax.set_title(f"fleet rollout to {report['target']}: VM blackout per wave"
                 + (" (halted)" if report["halted"] else ""))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
