"""Step-by-step comparison of the real kernel's answers with the emulated kernel's, and the
generated table (``docs/differential.md``).

A difference is one step whose records differ (an errno against an errno or a result, any
returned field, a memfd's size, position, seals or contents). Every difference must be a
deliberate deviation listed in :data:`liveupdate.scenario.differential.deviations.KNOWN`,
with its reason; :func:`verdict` says which differences are undocumented and which listed
deviations no longer happen (both fail the fast suite's test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from liveupdate.scenario.differential import emulated, handover
from liveupdate.scenario.differential.deviations import (
    FOUND_AND_FIXED,
    HANDOVER_KNOWN,
    KNOWN,
    Deviation,
)
from liveupdate.userspace.differential import stage_steps

Records = dict[str, dict[str, list[dict[str, Any]]]]


@dataclass(frozen=True)
class Difference:
    scenario: str
    stage: int
    index: int  # the step's index within its stage
    step: dict[str, Any]
    real: dict[str, Any]
    emulated: dict[str, Any]

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.scenario, self.stage, self.index)


@dataclass
class Comparison:
    scenarios: dict[str, tuple[int, int]]  # id -> (steps compared, agreements)
    differences: list[Difference]
    handover_values: int = 0  # values of the stable handover compared (0: not compared)
    handover_differences: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(n for n, _ in self.scenarios.values())

    @property
    def agreements(self) -> int:
        return sum(a for _, a in self.scenarios.values())


def compare(real: dict[str, Any], emulated: Records,
            jump: handover.Stable | None = None) -> Comparison:
    """``real`` is the kept data (:func:`liveupdate.realkernel.differential.answers`);
    ``jump`` the emulated handover, compared with the real one when the data has it."""
    per: dict[str, tuple[int, int]] = {}
    diffs: list[Difference] = []
    for sid, sc in real["scenarios"].items():
        n = agree = 0
        for stage in (1, 2):
            steps = stage_steps(sc["steps"], stage)
            ours = emulated[sid][f"stage{stage}"]
            theirs = sc[f"stage{stage}"]
            for i, (st, r, e) in enumerate(zip(steps, theirs, ours, strict=True)):
                n += 1
                if r == e:
                    agree += 1
                else:
                    diffs.append(Difference(sid, stage, i, st, r, e))
        per[sid] = (n, agree)
    c = Comparison(per, diffs)
    if jump is not None and real.get("handover"):
        c.handover_values = handover.leaves(real["handover"])
        c.handover_differences = handover.differences(real["handover"], jump)
    return c


def verdict(c: Comparison) -> tuple[list[Difference], list[Deviation]]:
    """(differences no deviation explains, listed deviations that did not happen)."""
    seen = {d.key for d in c.differences}
    undocumented = [d for d in c.differences if d.key not in KNOWN]
    stale = [dev for key, dev in KNOWN.items() if key not in seen]
    if c.handover_values:
        paths = {p for p, _, _ in c.handover_differences}
        undocumented += [Difference("handover", 0, 0, {"op": p}, {"value": r}, {"value": e})
                         for p, r, e in c.handover_differences if p not in HANDOVER_KNOWN]
        stale += [dev for p, dev in HANDOVER_KNOWN.items() if p not in paths]
    return undocumented, stale


def _short(record: dict[str, Any]) -> str:
    if "errno" in record:
        return str(record["errno"])
    return json.dumps(record, sort_keys=True)[:70].replace("|", "\\|")


def _what(step: dict[str, Any]) -> str:
    if step["op"] == "ioctl":
        fields = json.dumps(step.get("fields", {}), ensure_ascii=False)[:40]
        extra = f" size {step['size']}" if "size" in step else ""
        return f"{step['cmd']} on {step['target']} {fields}{extra}".replace("|", "\\|")
    rest = {k: v for k, v in step.items() if k not in ("op", "as")}
    return f"{step['op']} {json.dumps(rest)[:50]}".replace("|", "\\|")


def _value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)[:60].replace("|", "\\|")


def _handover(c: Comparison) -> list[str]:
    if not c.handover_values:
        return []
    n = len(c.handover_differences)
    lines = ["", "## The handover at the jump", "",
             "Decoded structure by structure (`luoctl inspect`'s report) and reduced to what "
             "is stable: the root's compatible, the subtrees in FDT order with their blob "
             "sizes, LUO's sessions and files in order (token, handler, size, position, "
             "seals, folio count and flags, index range), its FLBs, kexec-metadata. The real "
             "one from RAM saved at the jump, the emulated one from the next kernel's RAM "
             "before anything is retrieved (7.3 keeps the kexec-metadata page, as Linux "
             "does; the luo_ser page it gives back at boot is not reused by then).", "",
             f"**{c.handover_values} values compared, {c.handover_values - n} agree, {n} "
             "differ.**", ""]
    if n:
        lines += ["| value | real | emulated | why |", "|---|---|---|---|"]
        for path, r, e in c.handover_differences:
            dev = HANDOVER_KNOWN.get(path)
            why = f"*{dev.name}*" if dev else "**UNDOCUMENTED**"
            lines.append(f"| {path} | {_value(r)} | {_value(e)} | {why} |")
    return lines


def markdown(real: dict[str, Any], c: Comparison,
             about: dict[str, str] | None = None) -> str:
    """The table of ``docs/differential.md``."""
    undocumented, _stale = verdict(c)
    lines = [
        "# Differential suite: the real Linux against the emulated kernel",
        "",
        "Generated by `luoctl realkernel differential` (and checked by",
        "`tests/scenario/test_differential.py`) from the real kernel's answers kept in",
        f"`tests/realkernel/data/differential-{real['kernel_release']}.json`; do not edit.",
        "",
        f"- Real kernel: Linux {real['kernel_release']} (Debian {real['debian_version']}), "
        "under QEMU, one boot and one kexec for the whole batch.",
        "- Emulated: generation 7.3, one machine and one kexec, command line "
        f"`{emulated.CMDLINE}`.",
        "- Compared per step: the errno of every call, every field an ioctl returned (fd "
        "fields as *a new fd* / *unchanged*), each memfd's size, position, seals and sha256 "
        "before and after the kexec.",
        "",
        f"**{len(c.scenarios)} scenarios, {c.steps} steps compared, {c.agreements} agree, "
        f"{len(c.differences)} differ ({len(c.differences) - len(undocumented)} documented "
        f"deviations, {len(undocumented)} undocumented).**",
        "",
        "| scenario | what it does | steps | agree | differ |",
        "|---|---|---:|---:|---:|",
    ]
    about = about or {}
    for sid, (n, a) in c.scenarios.items():
        what = about.get(sid, about.get(sid.split("-")[0], ""))
        lines.append(f"| {sid} | {what} | {n} | {a} | {n - a} |")
    lines += ["", "## Remaining differences", ""]
    if not c.differences:
        lines.append("None.")
    else:
        lines += ["| scenario | stage.step | call | real | emulated | why |",
                  "|---|---|---|---|---|---|"]
        for d in c.differences:
            dev = KNOWN.get(d.key)
            why = f"*{dev.name}*" if dev else "**UNDOCUMENTED**"
            lines.append(f"| {d.scenario} | {d.stage}.{d.index} | {_what(d.step)} | "
                         f"{_short(d.real)} | {_short(d.emulated)} | {why} |")
    lines += _handover(c)
    devs = dict.fromkeys([*KNOWN.values(), *HANDOVER_KNOWN.values()])
    if devs:
        lines += ["", "## Why they differ", ""]
        lines += [f"- *{dev.name}*: {dev.reason}." for dev in devs]
    lines += ["", "## Found by the suite and fixed in the emulator", ""]
    lines += [f"- *{what}*: {fix}." for what, fix in FOUND_AND_FIXED]
    return "\n".join(lines) + "\n"
