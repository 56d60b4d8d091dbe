"""Every handover format, once: what it is called, its ``compatible``, its decoder, and which
kernel generations write it, can read it, and cannot boot a live update without it.

This is QEMU's ``VMStateDescription`` lesson: versioning is data. ``luoctl inspect`` (through
:mod:`liveupdate.tools.report`, which has one describer per name here), the fuzz runner,
kernel images (:mod:`liveupdate.abi.image` takes its generations from here), the kernel's
load-time check and luod's pre-flight all read this table.

Generations are the LUO generations of kernel images: ``none`` (a kernel without LUO, as
every release before 6.19), ``v3`` (the seed's state machine), ``6.19`` (sessions, struct
memfd-v1) and ``7.1`` (sessions + FLB, memfd-v2 with seals). The KHO-level formats are shared
by all of them; a ``none`` kernel reads none of the LUO ones. The matrix follows spec/luo.md
section 7:

* ``luo-v1`` with a ``luo-session-v2`` node is read by 6.19 and 7.x alike; v3's ``luo-v1``
  (with ``subsystems-v1``) by v3 only -- the compatible string is the same, the content is not.
* 7.0+ *requires* the ``luo-flb-v1`` node (``luo_flb_setup_incoming``: missing -> ENOENT ->
  panic), which 6.19 never writes; 6.19 ignores the node when a 7.x kernel writes it [I].
* file handlers match by exact ``compatible``: ``memfd-v1`` (struct) only on 6.19,
  ``memfd-v2`` only on 7.x; a mismatch makes every open of /dev/liveupdate fail with EIO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from liveupdate.abi import (
    bootparams,
    kho,
    khotest,
    luo_session,
    luo_v3,
    memblock,
    memfd,
)
from liveupdate.errors import AbiError

GENERATIONS = ("none", "v3", "6.19", "7.1")
ALL = frozenset(GENERATIONS)
SESSIONS = frozenset({"6.19", "7.1"})


@dataclass(frozen=True)
class Format:
    name: str  # the key, and the report's "kind"
    compatible: str  # what the blob carries ("" where the format has none)
    decode: Callable[[bytes], Any]  # the pure decoder of one blob of this format
    writers: frozenset[str]  # generations whose kernels write it
    readers: frozenset[str]  # generations whose kernels can read it
    required_by: frozenset[str] = frozenset()  # generations that cannot boot a handover
    #                                            that lacks it
    handler: bool = False  # a LUO file handler's format (mismatch: EIO, not panic)


def _setup_data(blob: bytes) -> bootparams.KhoData:
    node, _ = bootparams.decode_setup_data(blob)
    return bootparams.decode_kho_setup_data(node)


def _luo_session(blob: bytes) -> luo_session.LuoFdt:
    return luo_session.decode_luo_fdt(blob)


def _luo_flb(blob: bytes) -> luo_session.LuoFdt:
    return luo_session.decode_luo_fdt(blob, require_flb=True)


FORMATS: tuple[Format, ...] = (
    Format("setup_data", "SETUP_KEXEC_KHO", _setup_data, ALL, ALL),
    Format("kho-root", kho.KHO_FDT_COMPATIBLE, kho.decode_root, ALL, ALL, ALL),
    Format("memblock", memblock.MEMBLOCK_COMPATIBLE, memblock.decode, ALL, ALL),
    Format("kho-test", khotest.KHO_TEST_COMPAT, khotest.decode, ALL, ALL),
    Format("luo-v3", luo_v3.LUO_COMPATIBLE, luo_v3.decode_luo_fdt, frozenset({"v3"}),
           frozenset({"v3"})),
    Format("files-fdt", luo_v3.FILES_COMPATIBLE, luo_v3.decode_files_fdt, frozenset({"v3"}),
           frozenset({"v3"})),
    Format("memfd-fdt", memfd.MEMFD_V1, memfd.decode_fdt, frozenset({"v3"}),
           frozenset({"v3"}), handler=True),
    Format("luo-session", luo_session.SESSION_COMPATIBLE, _luo_session, SESSIONS, SESSIONS),
    Format("luo-flb", luo_session.FLB_COMPATIBLE, _luo_flb, frozenset({"7.1"}),
           SESSIONS, required_by=frozenset({"7.1"})),
    Format("memfd-v1", memfd.MEMFD_V1, lambda raw: memfd.decode_ser(raw, memfd.MEMFD_V1),
           frozenset({"6.19"}), frozenset({"6.19"}), handler=True),
    Format("memfd-v2", memfd.MEMFD_V2, lambda raw: memfd.decode_ser(raw, memfd.MEMFD_V2),
           frozenset({"7.1"}), frozenset({"7.1"}), handler=True),
)
BY_NAME = {f.name: f for f in FORMATS}


def get(name: str) -> Format:
    try:
        return BY_NAME[name]
    except KeyError:
        raise AbiError(msg=f"no handover format {name!r}") from None


def check_generation(gen: str) -> str:
    if gen not in GENERATIONS:
        raise AbiError(msg=f"unknown LUO generation {gen!r} (known: {', '.join(GENERATIONS)})")
    return gen


def written_by(gen: str, *, handlers: bool = True) -> list[Format]:
    """What a ``gen`` kernel can write; ``handlers=False`` leaves out file handler formats
    (those appear only when a file of that kind is preserved)."""
    check_generation(gen)
    return [f for f in FORMATS if gen in f.writers and (handlers or not f.handler)]


def describe(bad: list[Incompatibility]) -> str:
    """One line: what the reader cannot take."""
    return "; ".join(f"{'it cannot read' if i.reason == 'cannot read' else 'it requires'} "
                     f"{i.format.name} ({i.format.compatible})" for i in bad)


@dataclass(frozen=True)
class Incompatibility:
    format: Format
    reason: str  # "cannot read" or "requires"


def incompatibilities(writer: str, reader: str,
                      written: list[Format] | None = None) -> list[Incompatibility]:
    """What stops a ``reader`` kernel from taking over a ``writer`` kernel's handover.

    ``written`` narrows the check to what is actually in this handover (file handlers that
    preserved nothing do not count); by default every format ``writer`` can write."""
    check_generation(reader)
    out = written if written is not None else written_by(writer)
    bad = [Incompatibility(f, "cannot read") for f in out if reader not in f.readers]
    names = {f.name for f in out}
    bad += [Incompatibility(f, "requires") for f in FORMATS
            if reader in f.required_by and f.name not in names]
    return bad
