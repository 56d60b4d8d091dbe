"""The guest program and its memory layout (source: guest.S beside this file).

:data:`CODE` is what GNU ``as --64`` and ``objcopy -O binary -j .text`` make of guest.S,
checked in so that a machine with only Python runs VMs; :func:`assemble` rebuilds it (a test
compares the two when binutils are installed). Layout of guest-physical memory:

* 0x1000 -- the state page (offsets below); 0x2000 -- the PML4, 0x3000 -- the PDPT,
  0x4000.. -- one page directory per GiB (2 MiB pages, identity map, up to 64 GiB);
* :data:`STACK_TOP` -- the stack, growing down; :data:`CODE_AT` -- the code;
* :data:`DATA_AT` to the end of memory -- the pages the guest walks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

CODE = bytes.fromhex(
    "49b80010000000000000498b7820498b702849b9215453455547554c498b5810"
    "4885db75034889fb4839f372034889fb488b0348ffc04889034889d94c31c948"
    "894b084901400849ff004881c3001000004989581049f700ff0f000075ca0f31"
    "48c1e2204809d0498b48184883e13f498984c80001000049ff4018418b00e7e9"
    "eba6"
)
STATE_AT = 0x1000
PML4_AT, PDPT_AT, PD_AT = 0x2000, 0x3000, 0x4000
MAX_GUEST = 64 << 30
STACK_TOP = 0x100000
CODE_AT = 0x100000
DATA_AT = 0x200000
PAGE = 4096
STEP, CSUM, CUR, RING_I, DATA_START, DATA_END, RING = 0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x100
RING_LEN = 64
TAG = 0x4C55475545535421  # "!TSEUGUL": each page's word 1 is its address xor this
EXIT_PORT = 0xE9
STEPS_PER_EXIT = 4096


def assemble(source: str | None = None) -> bytes:
    """Build guest.S with GNU binutils (``as``, ``objcopy``)."""
    src = source or os.path.join(os.path.dirname(__file__), "guest.S")
    with tempfile.TemporaryDirectory() as d:
        obj, out = os.path.join(d, "g.o"), os.path.join(d, "g.bin")
        subprocess.run(["as", "--64", "-o", obj, src], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, out], check=True)
        with open(out, "rb") as f:
            return f.read()


def layout(mem: memoryview, size: int) -> None:
    """Write the page tables, the code and the state page of a fresh guest of ``size``."""
    if not DATA_AT + PAGE <= size <= MAX_GUEST or size % (2 << 20):
        raise ValueError("guest memory must be a multiple of 2 MiB from 4 MiB to 64 GiB")
    words = np.frombuffer(mem, np.uint64, count=size // 8)
    gib = -(-size // (1 << 30))
    words[PML4_AT // 8] = PDPT_AT | 3
    words[PDPT_AT // 8 : PDPT_AT // 8 + gib] = (PD_AT + PAGE * np.arange(gib, dtype=np.uint64)
                                                ) | np.uint64(3)
    huge = size >> 21
    words[PD_AT // 8 : PD_AT // 8 + huge] = (np.arange(huge, dtype=np.uint64) << np.uint64(21)
                                             ) | np.uint64(0x83)
    mem[CODE_AT : CODE_AT + len(CODE)] = CODE
    words[(STATE_AT + DATA_START) // 8] = DATA_AT
    words[(STATE_AT + DATA_END) // 8] = size


@dataclass(frozen=True)
class Check:
    ok: bool
    steps: int
    pages_touched: int
    problem: str


def verify(mem: memoryview, size: int) -> Check:
    """The guest's invariants over all of its memory (call it at an exit, when paused)."""
    words = np.frombuffer(mem, np.uint64, count=size // 8)
    steps = int(words[(STATE_AT + STEP) // 8])
    csum = int(words[(STATE_AT + CSUM) // 8])
    pages = words[DATA_AT // 8 :].reshape(-1, PAGE // 8)
    counters, tags = pages[:, 0], pages[:, 1]
    touched = counters != 0
    addrs = np.uint64(DATA_AT) + np.arange(len(pages), dtype=np.uint64) * np.uint64(PAGE)
    bad_tag = np.flatnonzero(touched & (tags != (addrs ^ np.uint64(TAG))))
    if bad_tag.size:
        return Check(False, steps, int(touched.sum()), f"page {int(addrs[bad_tag[0]]):#x} "
                     "carries another page's tag (misplaced or foreign)")
    total = int(counters.sum(dtype=np.uint64))
    if total != steps:
        return Check(False, steps, int(touched.sum()), f"the page counters sum to {total}, "
                     f"not the {steps} steps taken: a page was lost, zeroed or is stale")
    # sum of c(c+1)/2 in wrapping u64 arithmetic, as the guest adds: halve the even factor
    # first so that no product is divided after it wrapped
    one = np.uint64(1)
    even = counters % np.uint64(2) == 0
    halves = np.where(even, (counters // np.uint64(2)) * (counters + one),
                      counters * ((counters + one) // np.uint64(2)))
    want = int(halves.sum(dtype=np.uint64))
    if want != csum:
        return Check(False, steps, int(touched.sum()), "the running checksum does not match "
                     "the counters")
    return Check(True, steps, int(touched.sum()), "")


def steps(mem: memoryview) -> int:
    return int(np.frombuffer(mem, np.uint64, count=1, offset=STATE_AT + STEP)[0])


def latest_tsc(mem: memoryview) -> int:
    """The guest's newest TSC timestamp (0 before the first)."""
    words = np.frombuffer(mem, np.uint64, count=(RING - RING_I) // 8 + RING_LEN,
                          offset=STATE_AT + RING_I)
    n = int(words[0])
    return int(words[(RING - RING_I) // 8 + (n - 1) % RING_LEN]) if n else 0


def ring(mem: memoryview) -> list[int]:
    """The guest's TSC timestamps, oldest first."""
    words = np.frombuffer(mem, np.uint64, count=(STATE_AT + RING) // 8 + RING_LEN)
    n = int(words[(STATE_AT + RING_I) // 8])
    ring_words = words[(STATE_AT + RING) // 8 :]
    return [int(ring_words[i % RING_LEN]) for i in range(max(0, n - RING_LEN), n)]


if __name__ == "__main__":
    built = assemble()
    print("guest.S builds to the checked-in bytes" if built == CODE else
          f"guest.S differs from CODE: new bytes {built.hex()}")
    sys.exit(0 if built == CODE else 1)
