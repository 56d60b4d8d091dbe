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


class PhysParam(click.ParamType[int]):
    """A physical address or byte count: decimal, 0x hex, or a size with K/M/G."""

    name = "ADDR"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            n = int(str(value), 0)
        except ValueError:
            n = SizeParam().convert(value, param, ctx)
        if n < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return n


class PageAddrParam(PhysParam):
    """A page-aligned physical address."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        addr = super().convert(value, param, ctx)
        if addr % 4096:
            self.fail(f"{value!r} is not a page-aligned physical address", param, ctx)
        return addr


def fail(err: object) -> NoReturn:
    click.echo(f"luoctl: error: {err}", err=True)
    sys.exit(1)


def emit(data: Any, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human)
