"""The soak: many live updates in a row, and whether anything grew between them
(``luoctl demo --updates N``; scripts/soak runs 100).

The kernel, luod and the VMMs are new processes after every kexec; the machine process and
the emulated RAM live through all of them. What a leak would grow is compared once start-up
effects have settled.
"""

from __future__ import annotations

import itertools

from liveupdate.scenario.report import Check, SoakFigure, SoakResult, UpdateResult

FIGURES = ("preserved_pages", "free_pages", "kernel_files", "luod_fds", "machine_rss",
           "ram_resident")


def soak(results: list[UpdateResult]) -> SoakResult:
    """Resource figures at update 10 (half-way through runs shorter than 20) and at the last:
    what a leak would grow, once start-up effects have settled. With ``--to``, only updates
    into the same generation as the last are compared (each writes its own structures)."""
    last = results[-1]
    same = [r for r in results if r.to == last.to]  # --to: alternating kernels
    base = same[9 if len(same) >= 20 else max(0, len(same) // 2 - 1)]
    rows = {k: SoakFigure(base.update, base.figure(k), last.figure(k)) for k in FIGURES}
    steps = [[r.vms[vm].steps_at_pause or 0 for r in results] for vm in results[0].vms]
    increasing = all(all(b > a for a, b in itertools.pairwise(s)) for s in steps)
    # no growth of any kernel-side count; the host process's RSS within 5 % (allocator noise)
    leak = any(rows[k].growth > 0 for k in FIGURES[:4]) or \
        rows["machine_rss"].growth > rows["machine_rss"].start * 0.05 or \
        rows["ram_resident"].growth > rows["ram_resident"].start * 0.05
    return SoakResult(rows, increasing, leak)


def checks(results: list[UpdateResult], soaked: SoakResult | None) -> list[Check]:
    """The leak verdict: a kernel's own handover structures are the same size after every
    update into the same generation (each generation writes its own: like with like); over
    a soak, nothing grew and no guest restarted."""
    out = []
    for gen in sorted({r.to for r in results}):
        sizes = {(r.preserved_pages, r.free_pages) for r in results if r.to == gen}
        out.append(Check(f"handover pages into {gen} constant", "leak", len(sizes) <= 1,
                         ", ".join(f"preserved {p} free {f}" for p, f in sorted(sizes))))
    if soaked is not None:
        out.append(Check("soak: no resource growth", "leak", not soaked.leak,
                         ", ".join(f"{k} {f.growth:+}" for k, f in soaked.figures.items())))
        out.append(Check("soak: guest step counters strictly increasing", "leak",
                         soaked.steps_strictly_increasing))
    return out
