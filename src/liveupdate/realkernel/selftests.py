"""Run upstream's liveupdate selftests inside the real kernel, one boot each.

As ``tools/testing/selftests/liveupdate/vmtest.sh`` does: every kexec test gets a fresh boot
(its stage 2 expects exactly the sessions its stage 1 left), runs stage 1, kexecs into the
same kernel and runs stage 2. ``liveupdate`` (no kexec) runs once. The proof that the
harness does what upstream does is that they pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from liveupdate.realkernel import ktap
from liveupdate.realkernel.build import SELFTESTS, Image
from liveupdate.realkernel.host import say
from liveupdate.realkernel.vm import boot

__all__ = ["KEXEC_TESTS", "SELFTESTS", "Outcome", "run_all", "run_one"]

KEXEC_TESTS = tuple(t for t in SELFTESTS if t != "liveupdate")


@dataclass
class Outcome:
    result: ktap.Result
    seconds: float
    out: Path


def run_one(image: Image, test: str, out: Path, *, echo: bool = False) -> Outcome:
    kexec = test in KEXEC_TESTS
    run = boot(image, {"job": "selftest", "test": test, "kexec": kexec}, out / test,
               echo=echo)

    def stage(n: int) -> tuple[int | None, str]:
        path = run.out / f"{test}.stage{n}.ktap"
        return run.stage_rc(n), path.read_text() if path.exists() else ""

    if kexec:
        result = ktap.kexec_verdict(test, stage(1), stage(2))
    else:
        rc, text = stage(1)
        result = ktap.parse(test, text)
        if rc != 0 and result.ok:
            result.note = f"exited {rc}"
            result.cases.append((f"{test} exit status", "fail"))
        if not result.cases:
            result.note = "no KTAP output" if rc is not None else "the guest never ran it"
    return Outcome(result, run.seconds, run.out)


def run_all(image: Image, out: Path, tests: tuple[str, ...] = SELFTESTS, *,
            echo: bool = False) -> list[Outcome]:
    outcomes = []
    for test in tests:
        say(f"selftest {test}: booting Linux {image.release}")
        o = run_one(image, test, out, echo=echo)
        r = o.result
        say(f"selftest {test}: {'PASS' if r.ok else 'FAIL'} ({r.count('pass')} passed, "
            f"{r.count('fail')} failed, {r.count('skip')} skipped; {o.seconds:.0f} s)"
            + (f" -- {r.note}" if r.note else ""))
        outcomes.append(o)
    return outcomes
