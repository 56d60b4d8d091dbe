"""Read the results of upstream's selftests: KTAP from the kselftest harness, and the
kexec tests' own verdict.

``liveupdate`` is a kselftest-harness program: a ``1..N`` plan, ``ok N name`` / ``not ok N
name`` per case (``# SKIP reason`` after a skipped one) and a ``# Totals: pass:P fail:F
xfail:X xpass:XP skip:S error:E`` line (``tools/testing/selftests/kselftest.h``). The kexec
tests print ``ksft_print_msg`` lines and end stage 2 with ``--- ... TEST PASSED ---`` and exit
0, or ``Bail out!`` and a non-zero exit (``ksft_exit_fail_msg``); upstream's ``vmtest.sh``
judges them by ``TEST PASSED`` on the console, as :func:`kexec_verdict` does, plus both
stages' exit status.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CASE = re.compile(r"^\s*(not ok|ok) (\d+) (.*?)(?:\s+#\s*(SKIP|XFAIL|TODO)\b\s*(.*))?$")
_TOTALS = re.compile(r"^# Totals: (.*)$")


@dataclass
class Result:
    test: str
    cases: list[tuple[str, str]] = field(default_factory=list)  # (name, pass|fail|skip|xfail)
    totals: dict[str, int] = field(default_factory=dict)
    plan: int | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        if not self.cases:
            return False
        if self.plan is not None and len(self.cases) != self.plan:
            return False
        if self.totals and (self.totals.get("fail", 0) or self.totals.get("error", 0)
                            or self.totals.get("pass", 0) != self.count("pass")):
            return False
        return all(status != "fail" for _, status in self.cases)

    def count(self, status: str) -> int:
        return sum(1 for _, s in self.cases if s == status)


def parse(test: str, text: str) -> Result:
    res = Result(test)
    for line in text.splitlines():
        if m := re.match(r"^1\.\.(\d+)", line):  # the top-level plan, not a subtest's
            res.plan = int(m.group(1))
        elif line[:1] not in (" ", "\t") and (m := _CASE.match(line)):
            status = "fail" if m.group(1) == "not ok" else "pass"
            if m.group(4) == "SKIP":
                status = "skip"
            elif m.group(4) in ("XFAIL", "TODO"):  # expected to fail: not a regression
                status = "xfail"
            res.cases.append((m.group(3).strip(), status))
        elif m := _TOTALS.match(line):
            res.totals = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(1))}
    return res


def kexec_verdict(test: str, stage1: tuple[int | None, str],
                  stage2: tuple[int | None, str]) -> Result:
    """One case per kexec test: both stages exited 0 and stage 2 said ``TEST PASSED``."""
    (rc1, out1), (rc2, out2) = stage1, stage2
    res = Result(test, plan=1)
    if rc1 != 0:
        res.note = f"stage 1 exited {rc1}: {_last(out1)}"
    elif rc2 is None:
        res.note = "stage 2 never ran (no kexec, or the next kernel did not start it)"
    elif rc2 != 0 or "TEST PASSED" not in out2:
        res.note = f"stage 2 exited {rc2}: {_last(out2)}"
    res.cases.append((test, "fail" if res.note else "pass"))
    return res


def _last(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
