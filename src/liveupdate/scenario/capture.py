"""A real kernel's handover, captured at the jump: what ``luoctl capture`` writes.

Boots kernel generation ``writer`` in process (:mod:`liveupdate.scenario.inprocess`: the
emulated kernel's own code on real RAM) with ``test_kho=1``, preserves one memfd of known
contents where the writer has LUO (:func:`liveupdate.scenario.generations.preserve`), loads
``reader`` -- negotiating formats if asked -- and runs the reboot path up to the jump. The RAM
as the next kernel would find it (a sparse copy: only data extents) and the
``SETUP_KEXEC_KHO`` node are written out for ``luoctl inspect --ram``. Unlike ``luoctl
example`` (hand-laid bytes from the codecs), nothing here is written by anything but the
kernel.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupdate.abi import bootparams
from liveupdate.abi.image import KernelImage
from liveupdate.scenario import generations
from liveupdate.scenario.inprocess import Rig
from liveupdate.tools import ramfile


@dataclass(frozen=True)
class Captured:
    ram: Path
    setup_data: Path
    ram_size: int
    handover: dict[str, Any]  # mode and formats, as kexec_file_load decided
    console: list[str]


def capture(writer: str, reader: str, out: Path, *, negotiate: bool = False,
            memory: int = 1 << 30) -> Captured:
    line = "kho=on liveupdate=on test_kho=1" + (" liveupdate_negotiate=on" if negotiate
                                                 else "")
    rig, console = Rig(memory), io.StringIO()
    try:
        with contextlib.redirect_stdout(console):
            k = rig.boot(line, KernelImage.of(writer))
            if k.luo is not None:
                generations.preserve(k)
            # finalize only where 6.16/6.18 need it before the load; 6.19+ do it at reboot
            loaded = rig.jump(k, line, KernelImage.of(reader),
                              finalize=k.kho_out is not None
                              and k.kho_out.core.finalized_by_userspace)
        mem = rig.kernels[0].mem
        bp = bootparams.BootParams.decode(mem.read(loaded.boot_params, 4096, "boot params"))
        node = bootparams.read_setup_chain(mem, bp.setup_data)[0]
        out.mkdir(parents=True, exist_ok=True)
        (out / "setup_data.bin").write_bytes(
            mem.read(node.phys, bootparams.SETUP_HDR_SIZE + len(node.data), "setup_data"))
        _sparse_copy(rig.ram.fd, rig.ram.size, out / "ram.img")
    finally:
        rig.close()
    plan = loaded.plan
    handover: dict[str, Any] = {"mode": "native", "formats": k.image.native()} \
        if plan is None else {"mode": plan.mode,
                              "formats": plan.formats}
    return Captured(out / "ram.img", out / "setup_data.bin", memory, handover,
                    console.getvalue().splitlines())


def _sparse_copy(fd: int, size: int, path: Path) -> None:
    """Copy only the data extents of the RAM memfd (SEEK_DATA/SEEK_HOLE); all of it where
    the file cannot say which parts hold data."""
    extents = ramfile.data_extents(fd, size)
    if extents is None:
        extents = [(0, size)]
    dst = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(dst, size)
        for start, end in extents:
            end = min(end, size)
            while start < end:
                chunk = os.pread(fd, min(end - start, 8 << 20), start)
                os.pwrite(dst, chunk, start)
                start += len(chunk)
    finally:
        os.close(dst)
