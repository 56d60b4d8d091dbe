"""The ``kho-test-v1`` sub-FDT of lib/test_kho.c (spec/kho.md 7.1), subtree ``kho_test``.

Built sequentially::

    / { compatible = "kho-test-v1"; magic = <u32 0x4b484f21>;
        data { nr_folios = <u32>; folios_info = <...>; csum = <u32>; }; };

``folios_info`` is an inline ``u64[nr_folios]`` of ``phys | order`` (6.16) or a 16-byte
``struct kho_vmalloc`` of that array (6.18+). test_kho of each version requires exactly ``8 * n``
or 16 bytes; ``decode`` takes the form when the caller knows the producer, and otherwise infers
it (:func:`_infer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liveupdate.abi import fdt
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SIZE
from liveupdate.abi.vmalloc import DESC_SIZE, KhoVmalloc
from liveupdate.errors import AbiError

KHO_TEST_COMPAT = "kho-test-v1"
KHO_TEST_MAGIC = 0x4B484F21
KHO_TEST_SUBTREE = "kho_test"


@dataclass(frozen=True)
class KhoTest:
    nr_folios: int
    csum: int
    folios_info: np.ndarray | None  # uint64 phys|order, inline form
    folios_vmalloc: KhoVmalloc | None  # 6.18+ form


def encode(t: KhoTest) -> bytes:
    if (t.folios_info is None) == (t.folios_vmalloc is None):
        raise AbiError(msg="kho_test: give exactly one of inline folios_info or its vmalloc")
    if t.folios_info is not None:
        info = np.asarray(t.folios_info, dtype="<u8")
        if len(info) != t.nr_folios:
            raise AbiError(msg="kho_test: nr_folios does not match folios_info")
        info_bytes = info.tobytes()
    else:
        assert t.folios_vmalloc is not None
        info_bytes = t.folios_vmalloc.encode()
    b = fdt.SwBuilder().begin_node("")
    b.prop("compatible", fdt.string(KHO_TEST_COMPAT)).prop("magic", fdt.u32(KHO_TEST_MAGIC))
    b.begin_node("data").prop("nr_folios", fdt.u32(t.nr_folios))
    b.prop("folios_info", info_bytes).prop("csum", fdt.u32(t.csum))
    return b.end_node().end_node().finish()


def _infer(raw: bytes, n: int) -> str:
    """The form of ``folios_info``: 16 bytes are either form only when ``nr_folios`` is 2
    (two order-10 folios fill the 8 MiB test); then an inline entry is ``phys | 10`` and a
    ``kho_vmalloc``'s first field a page-aligned physical address, so the low bits decide."""
    if len(raw) != DESC_SIZE:
        return "inline"
    if 8 * n != DESC_SIZE:
        return "vmalloc"
    return "inline" if int.from_bytes(raw[:8], "little") & (PAGE_SIZE - 1) else "vmalloc"


def decode(blob: bytes, form: str | None = None) -> KhoTest:
    """``form`` is ``"inline"`` (6.16), ``"vmalloc"`` (6.18+) or None to infer."""
    what = "kho_test FDT"
    tree = fdt.parse(blob, what)
    tree.root.check_compatible(KHO_TEST_COMPAT, what)
    if tree.root.u32("magic", what) != KHO_TEST_MAGIC:
        raise AbiError(msg=f"{what}: bad magic")
    data = tree.root.need_child("data", what)
    n = data.u32("nr_folios", what)
    csum = data.u32("csum", what)
    raw = data.need("folios_info", what)
    if form not in (None, "inline", "vmalloc"):
        raise AbiError(msg=f"unknown kho_test form {form!r}")
    if form is None:
        form = _infer(raw, n)
    if form == "inline" and len(raw) == 8 * n:
        info = np.frombuffer(raw, "<u8").copy()
        order = info & np.uint64(PAGE_SIZE - 1)
        if n and int(order.max()) > MAX_PAGE_ORDER:
            raise AbiError(msg=f"{what}: a folio order exceeds {MAX_PAGE_ORDER}")
        return KhoTest(n, csum, info, None)
    if form == "vmalloc" and len(raw) == DESC_SIZE:
        return KhoTest(n, csum, None, KhoVmalloc.decode(raw))
    want = 8 * n if form == "inline" else DESC_SIZE
    raise AbiError(msg=f"{what}: folios_info is {len(raw)} bytes, not {want} ({form} form)")
