"""Rendering of JSON-able reports for people: a rich tree, tables for per-order counts."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from liveupdate.tools.report import errors as report_errors

_TABLES = {"per_order", "areas", "reserve_mem", "scratch", "preserved", "subtrees"}


def _table(rows: list[dict[str, Any]]) -> Table:
    t = Table(show_edge=False, pad_edge=False)
    for key in rows[0]:
        t.add_column(key, justify="right" if isinstance(rows[0][key], int) else "left")
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    return t


def _add(tree: Tree, key: str, value: Any, skip: str = "") -> None:
    if isinstance(value, dict):
        label = f"[bold]{key}[/]"
        if "error" in value:
            label += f"  [red]error: {value['error']}[/]"
        branch = tree.add(label)
        for k, v in value.items():
            if k not in ("error", skip):
                _add(branch, k, v)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        flat = all(not isinstance(x, dict | list) for row in value for x in row.values())
        if key in _TABLES and flat:
            tree.add(f"[bold]{key}[/]").add(_table(value))
            return
        branch = tree.add(f"[bold]{key}[/] ({len(value)})")
        for i, v in enumerate(value):
            label = "name" if "name" in v else "token" if "token" in v else ""
            _add(branch, str(v[label]) if label else str(i), v, skip=label)
    elif key == "ranges" and isinstance(value, list):
        shown = ", ".join(f"[{s}, {e})" for s, e in value[:8])
        more = f" ... (+{len(value) - 8})" if len(value) > 8 else ""
        tree.add(f"[bold]ranges[/] ({len(value)}): {shown}{more}")
    else:
        tree.add(f"[bold]{key}[/]: {value}")


def show(title: str, report: dict[str, Any], as_json: bool) -> None:
    """Print a report as JSON or as a tree."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(title, report, Console())


def exit_with_report(title: str, report: dict[str, Any], as_json: bool) -> NoReturn:
    """Show a decoded handover, then each error met while decoding it (one line each on
    standard error); exit 1 if there were any."""
    show(title, report, as_json)
    errs = report_errors(report)
    for line in errs:
        print(f"luoctl: error: {line}", file=sys.stderr)
    sys.exit(1 if errs else 0)


def print_report(title: str, report: dict[str, Any], console: Console) -> None:
    tree = Tree(f"[bold cyan]{title}[/]")
    for k, v in report.items():
        _add(tree, k, v)
    console.print(tree)
