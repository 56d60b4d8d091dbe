"""Shared CLI pieces: size parsing, one-line errors, JSON or human output."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SizeParam(click.ParamType[int]):
    """A byte size with an optional K/M/G/T suffix, as memparse."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        s = str(value).strip().upper().removesuffix("B").removesuffix("I")
        mult = SIZE_SUFFIXES.get(s[-1:], 1)
        digits = s[:-1] if s[-1:] in SIZE_SUFFIXES else s
        if not digits.isdigit() or int(digits) == 0:
            self.fail(f"{value!r} is not a size such as 4G or 512M", param, ctx)
        return int(digits) * mult


def fail(err: object) -> NoReturn:
    click.echo(f"luoctl: error: {err}", err=True)
    sys.exit(1)


def emit(data: Any, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human)
