"""Find the places that ask "which generation, which format" outside the generation objects.

A *generation question* is a comparison (``==``, ``!=``, ``in``, ``not in``, ``is``,
``is not``, or a ``match`` case) against a generation name, a release string, a handover
format or ``compatible`` string, a uAPI generation (``Gen.V3``), or a read of a KHO-core
capability flag (``.notifiers``). ``"none"`` (a component with no format, e.g. no FLB) is
too common a word to be one by itself (``--fault none``): it is a format question when the
other side of the comparison names a component (``flb``, ``fmts["luo"]``, ``memfd_fmt``).
Issue #21: these live in the generation objects and their tables only; everybody else asks
those objects.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from liveupdate.abi import formats, generations, uapi

SRC = Path(__file__).resolve().parents[2] / "src" / "liveupdate"
CAPABILITY_FLAGS = frozenset({"notifiers", "fill_needs_finalize"})


def words() -> frozenset[str]:
    """Every string that names a generation, a release or a format."""
    out: set[str] = set()
    for r in generations.RELEASES.values():
        out |= {r.name, r.release}
    out |= set(generations.LUO_GENERATIONS) - {"none"}
    for fmts in generations.ORDER.values():
        out |= set(fmts) - {"none"}
    out |= {f.compatible for f in formats.FORMATS if f.compatible}
    out |= {g.value for g in uapi.Gen}
    return frozenset(out)


def constants(vocab: frozenset[str]) -> frozenset[str]:
    """The abi constants (``MEMFD_V2``, ``LUO_V5``...) whose value is one of ``vocab``."""
    import importlib
    import pkgutil

    import liveupdate.abi as abi

    out: set[str] = set()
    for info in pkgutil.iter_modules(abi.__path__):
        mod = importlib.import_module(f"liveupdate.abi.{info.name}")
        out |= {n for n, v in vars(mod).items()
                if n.isupper() and isinstance(v, str) and v in vocab}
    return frozenset(out)


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _names(node: ast.AST, vocab: frozenset[str], consts: frozenset[str]) -> list[str]:
    found = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in vocab:
            found.append(repr(n.value))
        elif isinstance(n, ast.Attribute) and n.attr in consts:
            found.append(n.attr)
        elif isinstance(n, ast.Name) and n.id in consts:
            found.append(n.id)
        elif (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
              and n.value.id == "Gen"):
            found.append(f"Gen.{n.attr}")
    return found


def _names_a_component(node: ast.AST) -> bool:
    for n in ast.walk(node):
        word = (n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute)
                else n.value if isinstance(n, ast.Constant) and isinstance(n.value, str)
                else "")
        if any(c in word.lower() for c in generations.COMPONENTS):
            return True
    return False


def _no_format(node: ast.Compare) -> list[str]:
    sides = [node.left, *node.comparators]
    nones = [s for s in sides if isinstance(s, ast.Constant) and s.value == "none"]
    if nones and any(_names_a_component(s) for s in sides if s not in nones):
        return ["'none' (no format)"]
    return []


def scan_source(text: str, path: str, vocab: frozenset[str],
                consts: frozenset[str] = frozenset()) -> list[Hit]:
    hits: list[Hit] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                hits += [Hit(path, node.lineno, f"compares {w}")
                         for w in _names(side, vocab, consts)]
            hits += [Hit(path, node.lineno, f"compares {w}") for w in _no_format(node)]
        elif isinstance(node, ast.match_case):
            hits += [Hit(path, node.pattern.lineno, f"matches {w}")
                     for w in _names(node.pattern, vocab, consts)]
        elif isinstance(node, ast.Attribute) and node.attr in CAPABILITY_FLAGS:
            hits.append(Hit(path, node.lineno, f"reads the capability flag .{node.attr}"))
    return hits


def scan(allowed: frozenset[str], root: Path = SRC) -> list[Hit]:
    vocab = words()
    consts = constants(vocab)
    hits: list[Hit] = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel in allowed:
            continue
        hits += scan_source(p.read_text(), rel, vocab, consts)
    return hits
