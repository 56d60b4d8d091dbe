"""Guest damage ``luoctl demo --fault`` can plant, each of which the verdict must catch:

* ``flip-byte`` -- one random byte anywhere in a random guest data page gets a random other
  value, after the update (a restore that corrupts a byte);
* ``zero-tail`` -- a random data page is zeroed from a random offset to its end (a restore
  that loses part of a page: the old check read 16 bytes of each page, and missed this);
* ``swap-pages`` -- two random data pages trade places (a restore that maps folios out of
  order);
* ``cold-vcpu`` -- the VMM throws its saved vCPU state away at restore and starts the vCPU
  afresh (``python -m liveupdate.vmm --plant cold-start``), in place from boot on.

The memory damage is written into the machine's RAM through its debug port, at the physical
address the VMM says the guest page lies at: behind the guest's and the VMM's back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.vmm import guest

DAMAGE = ("flip-byte", "zero-tail", "swap-pages", "cold-vcpu")
PLANTED = {"cold-vcpu": "cold-start"}  # damage planted in the VMM at boot: its --plant


@dataclass(frozen=True)
class Damage:
    kind: str  # one of DAMAGE
    vm: str = "vm0"
    page: int | None = None  # data page index (random when None)
    offset: int | None = None  # byte within the page (random when None)


def apply(d: Damage, m: MachineClient, sock: str, vm_memory: int,
          rng: random.Random) -> str:
    """Do ``d`` to the VM whose control socket is ``sock``; say what was done."""
    if d.kind in PLANTED:
        return f"{d.vm}: {d.kind} (planted in its VMM at boot)"
    pages = (vm_memory - guest.DATA_AT) // guest.PAGE
    page = d.page if d.page is not None else rng.randrange(pages)
    offset = d.offset if d.offset is not None else rng.randrange(guest.PAGE)

    def hpa(page: int, offset: int = 0) -> int:
        gpa = guest.physical(guest.DATA_AT + page * guest.PAGE + offset)
        return int(ask(sock, "phys", gpa=gpa)["hpa"])

    if d.kind == "flip-byte":
        at = hpa(page, offset)
        old = m.ram_read(at, 1)[0]
        m.ram_write(at, bytes([old ^ rng.randrange(1, 256)]))
        return f"{d.vm}: byte {offset} of data page {page} changed"
    if d.kind == "zero-tail":
        at = hpa(page, offset)
        m.ram_write(at, bytes(guest.PAGE - offset))
        return f"{d.vm}: data page {page} zeroed from byte {offset} on"
    if d.kind == "swap-pages":
        other = (page + rng.randrange(1, pages)) % pages
        a, b = hpa(page), hpa(other)
        pa, pb = m.ram_read(a, guest.PAGE), m.ram_read(b, guest.PAGE)
        m.ram_write(a, pb)
        m.ram_write(b, pa)
        return f"{d.vm}: data pages {page} and {other} swapped"
    raise ValueError(f"unknown damage {d.kind!r}")
