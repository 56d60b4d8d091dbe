"""Where the differential suite's kept answers and table live, and how they are remade.

The real kernel's answers are data in the repository, keyed by kernel release
(:func:`data_path`); the table (``docs/differential.md``) is generated from them and a
fresh emulated run (:func:`emulated_comparison`), by ``luoctl realkernel differential``,
and the fast suite checks the committed table is what the generator makes of the data.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.scenario.differential import cases, compare, emulated

REPO = Path(__file__).resolve().parents[4]
DATA = REPO / "tests" / "realkernel" / "data"
DOC = REPO / "docs" / "differential.md"


def data_path(release: str) -> Path:
    return DATA / f"differential-{release}.json"


def kept() -> dict[str, Any]:
    """The newest kept answers (one file per kernel release)."""
    files = sorted(DATA.glob("differential-*.json"))
    if not files:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"no differential-*.json in {DATA}: "
                              "run luoctl realkernel differential")
    data: dict[str, Any] = json.loads(files[-1].read_text())
    return data


def stale_steps(data: dict[str, Any]) -> list[str]:
    """Scenarios whose kept steps are not today's (the answers must be recorded again)."""
    today = cases.batch()
    kept_steps = {sid: sc["steps"] for sid, sc in data["scenarios"].items()}
    return sorted(sid for sid in set(today) | set(kept_steps)
                  if today.get(sid) != kept_steps.get(sid))


def write_data(data: dict[str, Any]) -> Path:
    path = data_path(data["kernel_release"])
    path.parent.mkdir(parents=True, exist_ok=True)
    scenarios = ",\n".join(f" {json.dumps(sid)}: {json.dumps(sc, ensure_ascii=False)}"
                           for sid, sc in data["scenarios"].items())
    head = {k: v for k, v in data.items() if k != "scenarios"}
    path.write_text(json.dumps(head, indent=1)[:-2] + ',\n "scenarios": {\n' + scenarios
                    + "\n }\n}\n")
    return path


def emulated_comparison(data: dict[str, Any], work: Path) -> compare.Comparison:
    """The kept steps on an emulated 7.3 machine, compared with the kept answers."""
    batch = {sid: sc["steps"] for sid, sc in data["scenarios"].items()}
    records, jump = emulated.run(batch, work)
    return compare.compare(data, records, jump)


def regenerate(data: dict[str, Any], work: Path) -> tuple[str, compare.Comparison]:
    """The table for ``data``; written to :data:`DOC`."""
    c = emulated_comparison(data, work)
    text = compare.markdown(data, c, cases.ABOUT)
    DOC.write_text(text)
    return text, c
