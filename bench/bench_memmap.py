"""Encode and decode the preserved-memory map: kho-v1 (chunks + bitmaps) and kho-v3/v4 (the
7.1 radix tree), with kho-v1 as the baseline of the second table.

Run: .venv/bin/python bench/bench_memmap.py [--runs 7]

Scales: 1,048,576 order-0 pages (4 GiB, contiguous) and a mixed-order set (4 GiB worth of
random orders 0-10, shuffled). Encode = tracker bitmaps + chunk pages; decode = walk the chain,
validate, read the bitmaps and expand to block arrays. Median of --runs runs each; the target
(0.03 s each way) is the baseline column.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from liveupdate.abi import kho_memmap as mm
from liveupdate.abi import kho_radix
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem

TARGET_S = 0.03  # issue: encode and decode of 1 Mi order-0 pages each <= 0.03 s
META_BASE = 1 << 36  # metadata pages live above the 4 GiB being described


def order0(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n, dtype=np.uint64) << np.uint64(12), np.zeros(n, np.uint8)


def mixed(total_pages: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Orders 0-10 with P(order) ~ 2^-order (pages spread evenly over orders), shuffled."""
    rng = np.random.default_rng(seed)
    weights = 0.5 ** np.arange(11)
    draws = rng.choice(11, size=total_pages, p=weights / weights.sum()).tolist()
    phys, order, pfn = [], [], 0
    for o in draws:
        if pfn >= total_pages:
            break
        pfn = -(-pfn // (1 << o)) * (1 << o)
        phys.append(pfn << 12)
        order.append(o)
        pfn += 1 << o
    p, o = np.array(phys, np.uint64), np.array(order, np.uint8)
    idx = rng.permutation(len(p))
    return p[idx], o[idx]


def encode(phys: np.ndarray, order: np.ndarray) -> tuple[mm.Bitmaps, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    bm = mm.build_bitmaps(phys, order)
    bphys = META_BASE + np.arange(len(bm), dtype=np.uint64) * np.uint64(PAGE_SIZE)
    cphys = bphys[-1:] + np.uint64(PAGE_SIZE) * (
        1 + np.arange(bm.chunks_needed(), dtype=np.uint64)) if len(bm) else np.zeros(0)
    return bm, bphys, cphys, mm.encode_chunks(bm, bphys, cphys)


def median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    table = Table(title=f"kho-v1 memory map, median of {args.runs} runs (4096-byte bitmaps)")
    for col in ("set", "blocks", "pages", "map bytes", "encode s", "decode s", "pages/s enc",
                "pages/s dec", "target s", "enc/target", "dec/target"):
        table.add_column(col, justify="right")
    sets = (("order-0, 4 GiB", order0(1 << 20)), ("mixed orders 0-10, 4 GiB", mixed(1 << 20)))
    v1: dict[str, tuple[float, float]] = {}
    for name, (phys, order) in sets:
        pages = int((np.uint64(1) << order.astype(np.uint64)).sum())
        bm, bphys, cphys, chunks = encode(phys, order)
        ram = bytearray(int(cphys[-1] - bphys[0]) + PAGE_SIZE)
        for i, p in enumerate(bphys.tolist()):
            ram[p - META_BASE : p - META_BASE + PAGE_SIZE] = bm.bits[i].tobytes()
        for i, p in enumerate(cphys.tolist()):
            ram[p - META_BASE : p - META_BASE + PAGE_SIZE] = chunks[i].tobytes()
        mem = PhysMem(ram, base=META_BASE)
        got = mm.decode_mem_map(mem, int(cphys[0]), 4096)
        assert got.pages() == pages, "decode lost pages"
        t_enc = median(lambda p=phys, o=order: encode(p, o), args.runs)
        t_dec = median(lambda m=mem, c=int(cphys[0]): mm.decode_mem_map(m, c, 4096), args.runs)
        table.add_row(name, f"{len(phys):,}", f"{pages:,}",
                      f"{(len(bm) + len(cphys)) * PAGE_SIZE:,}", f"{t_enc:.4f}",
                      f"{t_dec:.4f}", f"{pages / t_enc:,.0f}", f"{pages / t_dec:,.0f}",
                      f"{TARGET_S}", f"{t_enc / TARGET_S:.2f}", f"{t_dec / TARGET_S:.2f}")
        v1[name] = (t_enc, t_dec)
    Console(width=170).print(table)
    radix = Table(title=f"kho-v3/v4 radix tree, median of {args.runs} runs (baseline: kho-v1 "
                        "above)")
    for col in ("set", "blocks", "nodes", "tree bytes", "encode s", "decode s", "enc/kho-v1",
                "dec/kho-v1"):
        radix.add_column(col, justify="right")
    for name, (phys, order) in sets:
        def alloc(state: list[int] = [META_BASE]) -> int:  # noqa: B006 -- a bump allocator
            state[0] += PAGE_SIZE
            return state[0] - PAGE_SIZE

        root, pages_ = kho_radix.encode(phys, order, alloc)
        ram = bytearray(max(pages_) + PAGE_SIZE - META_BASE)
        for p, page in pages_.items():
            ram[p - META_BASE : p - META_BASE + PAGE_SIZE] = page
        mem = PhysMem(ram, base=META_BASE)
        assert len(kho_radix.decode(mem, root)) == len(phys), "decode lost blocks"
        t_enc = median(lambda p=phys, o=order: kho_radix.encode(p, o, alloc), args.runs)
        t_dec = median(lambda m=mem, r=root: kho_radix.decode(m, r), args.runs)
        radix.add_row(name, f"{len(phys):,}", f"{len(pages_):,}",
                      f"{len(pages_) * PAGE_SIZE:,}", f"{t_enc:.4f}", f"{t_dec:.4f}",
                      f"{t_enc / v1[name][0]:.2f}", f"{t_dec / v1[name][1]:.2f}")
    Console(width=170).print(radix)


if __name__ == "__main__":
    main()
