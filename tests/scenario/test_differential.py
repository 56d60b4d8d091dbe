"""The differential suite in the fast suite: the real Linux 7.3's kept answers
(tests/realkernel/data/differential-<release>.json, recorded by ``luoctl realkernel
differential``) against a fresh run of the same steps on an emulated 7.3 machine (one
machine, one kexec), step by step; every difference is a listed deviation, and the committed
table (docs/differential.md) is what the generator makes of the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from liveupdate.scenario.differential import cases, compare, table
from liveupdate.scenario.differential.deviations import HANDOVER_KNOWN, KNOWN, Deviation

Data = dict[str, Any]


@pytest.fixture(scope="module")
def data() -> Data:
    return table.kept()


@pytest.fixture(scope="module")
def comparison(data: Data, tmp_path_factory: pytest.TempPathFactory) -> compare.Comparison:
    return table.emulated_comparison(data, tmp_path_factory.mktemp("differential"))


def test_kept_answers_are_for_todays_scenarios(data: Data) -> None:
    assert table.stale_steps(data) == [], "scenarios changed: luoctl realkernel differential"
    assert data["kernel_release"].startswith("7.3")
    assert len(data["scenarios"]) == len(cases.batch()) >= 7 + len(cases.SEEDS)


def test_emulated_73_answers_as_the_real_kernel_did(comparison: compare.Comparison) -> None:
    undocumented, stale = compare.verdict(comparison)
    assert [(d.key, d.real, d.emulated) for d in undocumented] == []
    assert stale == []
    assert comparison.steps > 300 and comparison.agreements == comparison.steps - len(KNOWN)
    # the handover at the jump too: the real one kept with the answers, the emulated one
    # read from the next kernel's RAM, every differing value listed
    assert comparison.handover_values > 300
    assert len(comparison.handover_differences) == len(HANDOVER_KNOWN)


def test_the_table_is_generated_from_the_kept_data(
        data: Data, comparison: compare.Comparison) -> None:
    assert table.DOC.read_text() == compare.markdown(data, comparison, cases.ABOUT)


def test_a_difference_fails_the_verdict(data: Data, comparison: compare.Comparison,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: one real answer changed is an undocumented difference, and
    a deviation whose step agrees again is stale."""
    sid, sc = "names", data["scenarios"]["names"]
    changed = {**data, "scenarios": {**data["scenarios"], sid: {
        **sc, "stage1": [{"errno": "EPERM"}, *sc["stage1"][1:]]}}}
    rerun = compare.compare(changed, _records(comparison, data))
    undocumented, _ = compare.verdict(rerun)
    assert [d.key for d in undocumented] == [("names", 1, 0)]
    healed = compare.compare(data, _records(comparison, data, heal=True))
    assert len(compare.verdict(healed)[1]) == len(set(KNOWN))
    gone = Deviation("gone", "a deviation the emulator no longer has")
    monkeypatch.setitem(compare.KNOWN, ("names", 1, 0), gone)
    assert compare.verdict(healed)[1][-1] == gone


def _records(c: compare.Comparison, data: Data,
             heal: bool = False) -> compare.Records:
    """The emulated records the comparison saw, rebuilt: the real ones where they agreed
    (and, with ``heal``, where they differed too)."""
    out: compare.Records = {}
    diffs = {d.key: d.emulated for d in c.differences}
    for sid, sc in data["scenarios"].items():
        out[sid] = {}
        for stage in (1, 2):
            out[sid][f"stage{stage}"] = [
                r if heal else diffs.get((sid, stage, i), r)
                for i, r in enumerate(sc[f"stage{stage}"])]
    return out


def test_data_path_is_keyed_by_release() -> None:
    assert table.data_path("7.3.4") == Path(table.DATA) / "differential-7.3.4.json"
