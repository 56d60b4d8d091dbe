"""``luoctl demo`` as one call: boot the demo machine, run its updates (or one faulted update),
shut it down, and return the :class:`~liveupdate.scenario.report.DemoReport` with its checks.
The CLI parses options and renders the report; the bench and the tests call these too."""

from __future__ import annotations

from liveupdate.scenario import soak, witness
from liveupdate.scenario.demo import Demo
from liveupdate.scenario.faultrun import faulted_update
from liveupdate.scenario.report import Check, DemoReport, FaultOutcome


def updates(demo: Demo, count: int, fault: str = "none") -> DemoReport:
    """``count`` live updates in a row; ``fault`` (``none``, or a kind of
    :data:`liveupdate.scenario.damage.DAMAGE`: the demo's :attr:`Demo.damage` is done) applies
    to the last. A run of more than one update is a soak: its resources are compared too."""
    try:
        demo.boot()
        results = [demo.update(n, fault if n == count else "none")
                   for n in range(1, count + 1)]
    finally:
        demo.close()
    soaked = soak.soak(results) if count > 1 else None
    checks = [c for r in results for c in r.checks()] + witness.checks(results) \
        + soak.checks(results, soaked)
    return DemoReport(updates=results, soak=soaked, checks=checks)


def faulted(demo: Demo) -> DemoReport:
    """One update with the demo's fault injected; the report is its observed outcome."""
    assert demo.fault is not None
    try:
        demo.boot()
        outcome = faulted_update(demo, demo.fault)
    finally:
        demo.close()
    return DemoReport(fault=outcome, checks=fault_checks(outcome))


def fault_checks(o: FaultOutcome) -> list[Check]:
    """A faulted update passes when the fault demonstrably happened, the outcome is the
    defined one and no workload was lost (``as_expected``, split into its parts)."""
    return [Check("fault injected", "fault", o.injected, o.update_error),
            Check("outcome as defined", "fault", o.outcome == o.expected,
                  f"{o.outcome} (defined: {o.expected})"),
            Check("no workload lost", "fault", not o.lost, ", ".join(o.lost))]
