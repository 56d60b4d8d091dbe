"""What a guest's clock does when its VMM sets the TSC, seen from inside the guest: the test's
own reading of the host's TSC (``rdtsc`` run from an executable page) against the guest's
timestamps -- the truth the accelerators' ``tsc_settable`` and the VMs' reported ``tsc`` are
held to."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

from liveupdate.vmm import cpu, guest

SIZE = 8 << 20
FAR = 1 << 60  # a TSC no host reaches (13 years at 2.8 GHz)
# rdtsc; shl $32, %rdx; or %rdx, %rax; ret
_RDTSC = bytes.fromhex("0f3148c1e2204809d0c3")
_page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
_page.write(_RDTSC)
host_tsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(_page)))


def observed(make: Any) -> tuple[str, Any]:
    """Load a vCPU whose saved TSC is :data:`FAR` into a fresh ``make`` accelerator, run the
    guest to its first exit and say what its clock read: ``restored`` (FAR and on), ``host``
    (the host's TSC, between the test's readings before and after) or ``lost`` (neither).
    Returns it with the accelerator."""
    buf = mmap.mmap(-1, SIZE)
    guest.layout(memoryview(buf), SIZE)
    a = make(ctypes.addressof(ctypes.c_char.from_buffer(buf)), SIZE)
    st = cpu.fresh()
    st.tsc = FAR
    before = host_tsc()
    a.load(st)
    a.run_to_exit()
    after = host_tsc()
    stamp = guest.latest_tsc(memoryview(buf))
    if FAR <= stamp < FAR + (after - before) + (1 << 40):
        return "restored", a
    return ("host" if before <= stamp <= after else "lost"), a
