"""The differential suite's real answers, recorded again on the real Linux 7.3 (one boot,
one kexec for every scenario) and checked against the ones kept in the repository
(tests/realkernel/data/differential-<release>.json), which the fast suite replays against
the emulated kernel. Run by ./scripts/test-realkernel (skipped in the fast suite); a
changed answer fails here with the fresh data left in build/realkernel-differential, and
``luoctl realkernel differential`` records it into the repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from liveupdate.realkernel import build, differential
from liveupdate.scenario.differential import compare, table

pytestmark = pytest.mark.realkernel

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("LIVEUPDATE_REALDIFF", ROOT / "build" / "realkernel-differential"))


def test_real_answers_are_the_kept_ones(tmp_path: Path) -> None:
    image = build.build()
    fresh = differential.record(image, OUT)
    (OUT / "answers.json").write_text(json.dumps(fresh, indent=1) + "\n")
    path = table.data_path(image.release)
    assert path.exists(), f"no kept answers for {image.release}: luoctl realkernel differential"
    kept = json.loads(path.read_text())
    changed = [(sid, stage) for sid, sc in fresh["scenarios"].items() for stage in
               ("stage1", "stage2") if kept["scenarios"].get(sid, {}).get(stage) != sc[stage]]
    assert changed == [], f"the real kernel answers differently now: {OUT / 'answers.json'}"
    assert {k: v for k, v in fresh.items() if k != "scenarios"} == \
        {k: v for k, v in kept.items() if k != "scenarios"}
    # and the emulated kernel still agrees with them, but for the listed deviations
    c = table.emulated_comparison(fresh, tmp_path / "emulated")
    assert compare.verdict(c) == ([], [])
