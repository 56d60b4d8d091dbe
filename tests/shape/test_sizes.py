"""Issue #21: small modules, one concept each -- no file in src/ over 400 lines."""

from __future__ import annotations

from tests.shape.genscan import SRC

LIMIT = 400


def long_files() -> list[str]:
    return [f"{p.relative_to(SRC)}: {n} lines" for p in sorted(SRC.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > LIMIT]


def test_no_source_file_over_the_limit() -> None:
    assert not long_files(), "split these:\n" + "\n".join(long_files())
