"""The guest program and its memory layout (source: guest.S beside this file).

:data:`CODE` is what GNU ``as --64`` and ``objcopy -O binary -j .text`` make of guest.S,
checked in so that a machine with only Python runs VMs; :func:`assemble` rebuilds it (a test
compares the two when binutils are installed). Layout of guest-physical memory:

* 0x1000 -- the state page (offsets below); 0x2000 -- the PML4, 0x3000 -- the PDPT,
  0x4000.. -- one page directory per GiB (2 MiB pages, identity map, up to 64 GiB);
* :data:`STACK_TOP` -- the stack, growing down; :data:`CODE_AT` -- the code;
* :data:`DATA_AT` to the end of memory -- the pages the guest walks.

Those are the guest's *virtual* addresses, and equal to offsets in the VMM's memory file.
Guest-physical memory has the PC's hole below 4 GiB (:data:`HOLE_AT` to 4 GiB: the local
APIC at 0xFEE00000, which KVM claims whatever the guest's memory slots say, and the 32-bit
PCI window), as QEMU's ``pc`` machine splits RAM at 3 GiB: a guest larger than 3 GiB has its
memory above the hole in a second slot (:func:`regions`), and its page tables map the virtual
addresses past :data:`HOLE_AT` to there -- the guest program walks a flat range either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

CODE = bytes.fromhex(
    "49b8001000000000000049ff40300f3148c1e2204809d04883c8014989c2498b"
    "7820498b702849b9215453455547554c498b58104885db75034889fb4839f372"
    "034889fb488b0348ffc04889034889d94c31c948894b08490140084d89503849"
    "ff004881c3001000004989581049f700ff0f000075c60f3148c1e2204809d049"
    "8b48184883e13f498984c80001000049ff4018418b00e7e9eba2"
)
STATE_AT = 0x1000
PML4_AT, PDPT_AT, PD_AT = 0x2000, 0x3000, 0x4000
MAX_GUEST = 64 << 30
STACK_TOP = 0x100000
CODE_AT = 0x100000
DATA_AT = 0x200000
PAGE = 4096
STEP, CSUM, CUR, RING_I, DATA_START, DATA_END, RING = 0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x100
ENTRIES, SECRET = 0x30, 0x38  # times the guest was entered at _start; r10's mirror
SECRET_REG = "r10"  # the register that alone carries the secret between steps
RING_LEN = 64
TAG = 0x4C55475545535421  # "!TSEUGUL": words 1..511 of a data page are its address xor this
EXIT_PORT = 0xE9
STEPS_PER_EXIT = 4096
CHUNK_PAGES = 4096  # pages checked at a time: 16 MiB of temporaries for any guest size
AD_BITS = np.uint64(0x60)  # accessed and dirty: the CPU sets them in the page tables
_WORDS = PAGE // 8
HOLE_AT, HOLE_END = 3 << 30, 4 << 30


def regions(size: int) -> list[tuple[int, int, int]]:
    """The guest-physical slots of a guest of ``size``: (guest-physical address, offset in
    the memory file, length) -- one below the hole, one above it when the guest is larger."""
    low = min(size, HOLE_AT)
    return [(0, 0, low)] + ([(HOLE_END, HOLE_AT, size - HOLE_AT)] if size > HOLE_AT else [])


def file_offset(gpa: int) -> int | None:
    """Where guest-physical ``gpa`` lies in the memory file (None: in the hole)."""
    return gpa if gpa < HOLE_AT else None if gpa < HOLE_END else gpa - (HOLE_END - HOLE_AT)


def physical(virtual: int) -> int:
    """The guest-physical address of a guest-virtual one (the page tables' map)."""
    return virtual + (HOLE_END - HOLE_AT if virtual >= HOLE_AT else 0)


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
    """Write the page tables, the code and the state page of a fresh guest of ``size``, and
    fill words 1 to 511 of each data page with the page's address xor :data:`TAG` -- as
    firmware loads a guest image: the guest keeps word 1 stamped, the checker knows every
    byte. (``mem`` shorter than ``size``: only what lies below the data.)"""
    if not DATA_AT + PAGE <= size <= MAX_GUEST or size % (2 << 20):
        raise ValueError("guest memory must be a multiple of 2 MiB from 4 MiB to 64 GiB")
    words = np.frombuffer(mem, np.uint64, count=DATA_AT // 8)
    gib = -(-size // (1 << 30))
    words[PML4_AT // 8] = PDPT_AT | 3
    words[PDPT_AT // 8 : PDPT_AT // 8 + gib] = (PD_AT + PAGE * np.arange(gib, dtype=np.uint64)
                                                ) | np.uint64(3)
    huge = size >> 21
    words[PD_AT // 8 : PD_AT // 8 + huge] = np.fromiter(
        (physical(i << 21) | 0x83 for i in range(huge)), np.uint64, huge)
    mem[CODE_AT : CODE_AT + len(CODE)] = CODE
    words[(STATE_AT + DATA_START) // 8] = DATA_AT
    words[(STATE_AT + DATA_END) // 8] = size
    if len(mem) >= size:  # the data pages' fill: what makes every byte of a page known
        pages = np.frombuffer(mem, np.uint64, count=(size - DATA_AT) // 8,
                              offset=DATA_AT).reshape(-1, _WORDS)
        for first in range(0, len(pages), CHUNK_PAGES):
            chunk = pages[first : first + CHUNK_PAGES, 1:]
            chunk[:] = _fill(first, len(chunk))[:, None]


@dataclass(frozen=True)
class Check:
    ok: bool
    steps: int
    pages_touched: int
    problem: str
    secret: int = 0  # the guest's mirror of its register-only secret
    entries: int = 0  # times the guest's vCPU started at its entry point


def verify(mem: memoryview, size: int, secret: int | None = None) -> Check:
    """Every byte of the guest's memory against the guest's own records (call it at an
    exit, when paused): the counters are what ``steps`` steps of the walk leave, the
    checksum matches them, every other byte of a data page is its fill, the state page
    holds only its fields, the page tables, code and stack are the layout's, the guest was
    entered once, and -- given the saved vCPU's ``secret`` register -- its mirror in memory
    is that register. numpy over the mapping, 16 MiB at a time: no copy of the guest."""
    words = np.frombuffer(mem, np.uint64, count=size // 8)
    st = words[STATE_AT // 8 : STATE_AT // 8 + _WORDS]
    steps, csum = int(st[STEP // 8]), int(st[CSUM // 8])
    pages = words[DATA_AT // 8 :].reshape(-1, _WORDS)
    counters = pages[:, 0]
    touched = counters != 0
    n_touched = int(touched.sum())
    mirror, entries = int(st[SECRET // 8]), int(st[ENTRIES // 8])

    def result(problem: str) -> Check:
        return Check(not problem, steps, n_touched, problem, mirror, entries)

    total = int(counters.sum(dtype=np.uint64))
    if total != steps:
        return result(f"the page counters sum to {total}, not the {steps} steps taken: a "
                      "page was lost, zeroed or is stale")
    problem = _pages(pages) or _walk(counters, steps) or _checksum(counters, csum) \
        or _state(st, size, steps, len(pages), secret) or _low(words, size)
    return result(problem)


def _fill(first: int, n: int) -> np.ndarray:
    """The fill of data pages ``first`` to ``first + n``: each page's address xor TAG."""
    return (np.uint64(DATA_AT + first * PAGE) + np.arange(n, dtype=np.uint64)
            * np.uint64(PAGE)) ^ np.uint64(TAG)


def _pages(pages: np.ndarray) -> str:
    """Words 1..511 of every data page are its fill (word 0 is the counter, checked apart).
    The first wrong byte is named."""
    for first in range(0, len(pages), CHUNK_PAGES):
        chunk = pages[first : first + CHUNK_PAGES, 1:]
        want = _fill(first, len(chunk))
        wrong = chunk != want[:, None]
        if wrong.any():
            row, word = (int(x) for x in np.argwhere(wrong)[0])
            return _byte_problem(DATA_AT + (first + row) * PAGE, word + 1, chunk[row])
    return ""


def _byte_problem(page: int, word: int, fill: np.ndarray) -> str:
    """Name the first wrong byte of ``page`` (``word`` is its first wrong word, ``fill``
    words 1..511). A page is called misplaced only when all its fill is one other page's: a
    single changed byte can make a word look like another page's tag by chance."""
    value = int(fill[word - 1])
    diff = (value ^ page ^ TAG).to_bytes(8, "little")
    off = 8 * word + next(i for i, b in enumerate(diff) if b)
    foreign = value ^ TAG
    if foreign % PAGE == 0 and DATA_AT <= foreign < MAX_GUEST and bool((fill == value).all()):
        return f"page {page:#x} carries another page's tag (misplaced or foreign) at byte {off}"
    return f"page {page:#x} byte {off} is not the page's fill: changed behind the guest"


def _walk(counters: np.ndarray, steps: int) -> str:
    """The walk visits pages in order, so ``steps`` fixes every counter."""
    q, r = divmod(steps, len(counters))
    want = np.full(len(counters), q, np.uint64)
    want[:r] += np.uint64(1)
    bad = np.flatnonzero(counters != want)
    if bad.size:
        i = int(bad[0])
        return (f"page {DATA_AT + i * PAGE:#x} was visited {int(counters[i])} times; the "
                f"guest's walk visited it {int(want[i])} times: stale or misplaced")
    return ""


def _checksum(counters: np.ndarray, csum: int) -> str:
    # sum of c(c+1)/2 in wrapping u64 arithmetic, as the guest adds: halve the even factor
    # first so that no product is divided after it wrapped
    one = np.uint64(1)
    even = counters % np.uint64(2) == 0
    halves = np.where(even, (counters // np.uint64(2)) * (counters + one),
                      counters * ((counters + one) // np.uint64(2)))
    if int(halves.sum(dtype=np.uint64)) != csum:
        return "the running checksum does not match the counters"
    return ""


def _state(st: np.ndarray, size: int, steps: int, npages: int, secret: int | None) -> str:
    """Every field of the state page, and zero elsewhere in it."""
    entries, mirror, n = int(st[ENTRIES // 8]), int(st[SECRET // 8]), int(st[RING_I // 8])
    if int(st[DATA_START // 8]) != DATA_AT or int(st[DATA_END // 8]) != size:
        return "the state page's data bounds are not the layout's"
    if steps % STEPS_PER_EXIT or n != steps // STEPS_PER_EXIT:
        return f"{steps} steps and {n} timestamps: not the state of an exit"
    cur = DATA_AT + ((steps - 1) % npages + 1) * PAGE if steps else 0
    if int(st[CUR // 8]) != cur:
        return f"the current page is {int(st[CUR // 8]):#x}, not {cur:#x}"
    if entries > 1 or (steps and entries != 1):
        return (f"the guest was entered {entries} times: its vCPU started again at the "
                "entry point (a cold start), it was not restored")
    if steps and (mirror & 1 == 0 or (secret is not None and mirror != secret)):
        return ("the guest's register-only secret changed: the vCPU did not continue with "
                "its saved registers")
    used = np.zeros(_WORDS, bool)
    used[: SECRET // 8 + 1] = True
    used[RING // 8 : RING // 8 + min(n, RING_LEN)] = True
    if st[~used].any():
        return f"state page byte {8 * int(np.flatnonzero(st * ~used)[0]):#x} is not zero"
    return ""


def _low(words: np.ndarray, size: int) -> str:
    """Below the data: zero page, page tables (less the accessed and dirty bits the CPU
    sets), stack and code exactly as :func:`layout` wrote them."""
    low = bytearray(DATA_AT)
    layout(memoryview(low), size)
    want = np.frombuffer(low, np.uint64)
    got = words[: DATA_AT // 8].copy()
    got[STATE_AT // 8 : (STATE_AT + PAGE) // 8] = want[STATE_AT // 8 : (STATE_AT + PAGE) // 8]
    tables = slice(PML4_AT // 8, CODE_AT // 8)
    got[tables] &= ~AD_BITS
    bad = np.flatnonzero(got != want)
    if bad.size:
        return (f"guest byte {8 * int(bad[0]):#x} (zero page, page tables, stack or code) is "
                "not the layout's")
    return ""


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
