"""Fuzz one decoder with hypothesis; run as ``python -m tests.abi.fuzz_runner NAME [N]``.

Runs in its own process (see test_fuzz.py) so that a segfault in libfdt or a hang fails a
test instead of killing pytest. Inputs are random bytes and mutations of valid blobs:
truncated, oversized, wrong magic, wrong compatible, lying header fields, flipped bytes.
Exit status 0 means every input either decoded or raised AbiError.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from collections.abc import Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveupdate.abi import (
    bootparams,
    fdt,
    formats,
    image,
    iommu_flb,
    iommufd,
    kexec_metadata,
    kho,
    kho_block,
    kho_memmap,
    kho_radix,
    khotest,
    luo_ser,
    luo_session,
    luo_v3,
    memblock,
    memfd,
    negotiation,
    pci_flb,
    uapi,
    vfio_pci,
    vmalloc,
    wire,
)
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError
from liveupdate.tools import report
from tests.conftest import FakeRam

# The blob that segfaults pylibfdt 1.7.2 when libfdt sees it unchecked.
SEGFAULT_BLOB = struct.pack(">10I", 0xD00DFEED, 0x7FFFFFFF, 0x38, 0x40000000, 0x28, 17, 16, 0,
                            0x100, 0x10) + bytes(64)


def _v3_root() -> bytes:
    live = kho.LiveRoot(kho.KHO_V3, 0x100000)
    live.add_subtree("LUO", 0x101000, 32)
    return live.blob


def _seeds() -> dict[str, bytes]:
    v = vmalloc.KhoVmalloc(0x101000, 1, 1, 0)
    f = memfd.Folios(np.array([0x200], np.uint64), np.array([3], np.uint16),
                     np.array([0], np.uint64))
    return {
        "kho-root": kho.encode_root_sequential(0x116BE4000, [("memblock", 0x117150000)]),
        "luo-v3": luo_v3.encode_luo_fdt([("file-descriptors", 0x1000)]),
        "files-fdt": luo_v3.encode_files_fdt([luo_v3.FileEntry(0x1A, "memfd-v1", 0x2000)]),
        "luo-session": luo_session.encode_luo_fdt(1, 0x100000, None),
        "luo-flb": luo_session.encode_luo_fdt(1, 0x100000, 0x200000),
        "luo-v5": luo_ser.encode(luo_ser.LuoSer(1, 0x100000, 0x101000)),
        "lu-negotiation": negotiation.encode(negotiation.Record(
            "7.2.0-lu", "6.19.0-lu", {"kho": "kho-v1", "luo": "luo-v1", "memfd": "memfd-v1"})),
        "kho-root-v3": _v3_root(),
        "kexec-metadata": kexec_metadata.encode(kexec_metadata.KexecMetadata("7.1.0-lu", 3)),
        "memfd-fdt": memfd.encode_fdt(memfd.MemfdState(0, 4096, f)),
        "kho-test": khotest.encode(khotest.KhoTest(1, 5, None, v)),
        "kho-test-inline": khotest.encode(khotest.KhoTest(1, 5, np.array([0x2000]), None)),
        "memblock": memblock.encode([memblock.ReserveMem("trace", 0x1000, 0x2000)]),
        "setup_data": bootparams.kho_setup_data(bootparams.KhoData(0x100000, 4096,
                                                                   0x101000, 16)),
        "boot_params": bootparams.BootParams(cmd_line_ptr=0x100000).encode(),
        "memfd-v1": memfd.encode_ser(memfd.MemfdSer(0, 4096, 1, v)),
        "memfd-v2": memfd.encode_ser(memfd.MemfdSer(0, 4096, 1, v, 1, memfd.MEMFD_V2)),
        "ioctl": uapi.ioctl(uapi.Gen.V6_19, "CREATE_SESSION").pack(name="x"),
        "image": image.KernelImage().encode(),
        "wire": wire.pack({"op": "kexec_file_load", "cmdline": "kho=on"}, b"payload"),
        "vfio-pci-v1": vfio_pci.encode(vfio_pci.VfioPciSer(0, 0x318)),
        "pci-flb": pci_flb.encode_ser(pci_flb.PciSer(2, 1, 0x101000)),
        "iommufd-v1": iommufd.encode([iommufd.Hwpt(0x101040, 7)]),
    }


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "extend", "flip", "header", "magic",
                                 "compat", "segv"]))
    b = bytearray(seed)
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "truncate":
        return bytes(b[: draw(st.integers(0, max(0, len(b) - 1)))])
    if kind == "extend":
        return bytes(b) + draw(st.binary(min_size=1, max_size=64))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "header" and len(b) >= 40:
        i = draw(st.integers(0, 9))
        b[4 * i : 4 * i + 4] = struct.pack(">I", draw(st.sampled_from(
            [0, 1, 0x28, 0x38, len(b), len(b) + 1, 0x7FFFFFFF, 0x40000000, 0xFFFFFFFF])
            | st.integers(0, 2**32 - 1)))
        return bytes(b)
    if kind == "magic":
        return b"\xd0\x0d\xfe\xee" + bytes(b[4:])
    if kind == "compat":
        for old in (b"kho-v1", b"kho-v3", b"luo-v5", b"luo-v1", b"memfd-v1", b"kho-test-v1",
                    b"memblock-v1", b"file-descriptors-v1", b"luo-session-v2", b"reserve-mem-v1"):
            b = bytearray(bytes(b).replace(old, old[:-1] + b"9"))
        return bytes(b)
    return SEGFAULT_BLOB


def ram_mutated(draw: st.DrawFn) -> tuple[PhysMem, int]:
    """A small RAM with a valid structure at its base, then mutated; plus a pointer."""
    ram = FakeRam(pages=24, base=0x100000)
    raw = draw(st.binary(min_size=0, max_size=256))
    off = draw(st.integers(0, len(ram.buf) - 1))
    ram.buf[off : off + len(raw)] = raw[: len(ram.buf) - off]
    ptr = draw(st.sampled_from([0x100000, 0x101000, 0x100008, 0, 0xFFFFFFFFFFFFF000])
               | st.integers(0, 2**64 - 1))
    return ram.mem(), ptr


def _mem_map(draw: st.DrawFn) -> None:
    ram = FakeRam(pages=24, base=0x100000)
    bm = kho_memmap.build_bitmaps(np.array([0x200000, 0x400000], np.uint64),
                                  np.array([0, 9], np.uint8))
    bphys = np.array([0x100000 + 0x1000 * (i + 2) for i in range(len(bm))], np.uint64)
    for p, bits in zip(bphys.tolist(), bm.bits, strict=True):
        ram.put(p, bits.tobytes())
    chunks = np.array([0x100000 + 0x1000 * i for i in range(bm.chunks_needed())], np.uint64)
    for p, page in zip(chunks.tolist(), kho_memmap.encode_chunks(bm, bphys, chunks),
                       strict=True):
        ram.put(p, page)
    raw = draw(st.binary(max_size=64))
    off = draw(st.integers(0, 0x3000))
    ram.buf[off : off + len(raw)] = raw
    kho_memmap.decode_mem_map(ram.mem(), draw(st.sampled_from([0x100000, 0x100010])),
                              draw(st.sampled_from([None, 4096, 512])))


def _radix(draw: st.DrawFn) -> None:
    ram = FakeRam(pages=24, base=0x100000)
    root, pages = kho_radix.encode(np.array([0x101000, 0x200000], np.uint64),
                                   np.array([0, 9], np.uint8), ram.alloc)
    for p, page in pages.items():
        ram.put(p, page)
    raw = draw(st.binary(max_size=64))
    off = draw(st.integers(0, len(ram.buf) - 1))
    ram.buf[off : off + len(raw)] = raw[: len(ram.buf) - off]
    kho_radix.decode(ram.mem(), draw(st.sampled_from([root, root + 8, 0])
                                     | st.integers(0, 2**64 - 1)))


def _blocks(draw: st.DrawFn) -> None:
    mem, ptr = ram_mutated(draw)
    kho_block.decode(mem, ptr, draw(st.sampled_from([64, 80, 16])), "fuzz")
    luo_ser.decode_sessions(mem, ptr)


def _sessions_73(draw: st.DrawFn) -> None:
    """7.3.4: the session chain at boot, its entries and file chains at the first open."""
    mem, ptr = ram_mutated(draw)
    rows, blocks = luo_ser.session_rows(mem, ptr)
    luo_session.deserialize_73(rows, luo_ser.file_reader(mem, blocks))


def _posted(draw: st.DrawFn) -> None:
    """The posted series' lists in RAM: the PCI FLB's device blocks, the IOMMU FLB."""
    mem, ptr = ram_mutated(draw)
    pci_flb.decode_devices(mem, pci_flb.PciSer(2, draw(st.integers(0, 600)), ptr))
    iommu_flb.decode(mem, ptr)


def _sessions(draw: st.DrawFn) -> None:
    mem, ptr = ram_mutated(draw)
    luo_session.decode_sessions(mem, ptr)
    luo_session.decode_flbs(mem, ptr)


def _vmalloc(draw: st.DrawFn) -> None:
    mem, ptr = ram_mutated(draw)
    desc = vmalloc.KhoVmalloc.decode(draw(mutated(SEEDS["memfd-v1"]))[24:40].ljust(16, b"\0"))
    vmalloc.decode(mem, vmalloc.KhoVmalloc(ptr, desc.total_pages, desc.flags, desc.order))


def _boot(draw: st.DrawFn) -> None:
    mem, ptr = ram_mutated(draw)
    bp = bootparams.BootParams.decode(draw(mutated(SEEDS["boot_params"])))
    bootparams.BootParams(bp.e820, ptr, bp.cmdline_size, 0).read_cmdline(mem)
    bootparams.read_setup_chain(mem, ptr)


def _inspect(draw: st.DrawFn) -> None:
    mem, _ = ram_mutated(draw)
    blob = draw(mutated(draw(st.sampled_from(sorted(SEEDS.values())))))
    report.describe(blob, mem)


def _blob(seed: str, fn: Callable[[bytes], object]) -> Callable[[st.DrawFn], None]:
    return lambda draw: (fn(draw(mutated(SEEDS[seed]))), None)[1]


# Every handover format of the one table, with its seed; then what is not a handover format.
DECODERS: dict[str, Callable[[st.DrawFn], None]] = {
    **{f"format.{f.name}": _blob(f.name, f.decode) for f in formats.FORMATS},
    "fdt.parse": _blob("kho-root", fdt.parse),
    "kho_memmap.decode_mem_map": _mem_map,
    "kho_radix.decode": _radix,
    "kho_block.decode": _blocks,
    "kho.decode_root.v3": _blob("kho-root-v3", kho.decode_root),
    "vmalloc.decode": _vmalloc,
    "bootparams.boot_params": _boot,
    "bootparams.scratch": _blob("setup_data", bootparams.decode_scratch),
    "bootparams.chosen": _blob("setup_data", lambda b: bootparams.decode_chosen_range(b[:16])),
    "luo_session.decode_sessions": _sessions,
    "luo_session.deserialize_73": _sessions_73,
    "memfd.decode_folio_array": _blob("memfd-v1", lambda b: memfd.decode_folio_array(
        b, len(b) // 16, 1 << 20)),
    "khotest.decode_inline": _blob("kho-test-inline", khotest.decode),
    "uapi.lookup": _blob("ioctl", lambda b: uapi.lookup(
        uapi.Gen.V6_19, uapi.Target.DEVICE, 0xBA00, b)),
    "report.describe": _inspect,
    "image.decode": _blob("image", image.decode),
    "wire.unpack": _blob("wire", wire.unpack),
    "vfio_pci.decode": _blob("vfio-pci-v1", vfio_pci.decode),
    "pci_flb.decode_ser": _blob("pci-flb", pci_flb.decode_ser),
    "iommufd.decode": _blob("iommufd-v1", iommufd.decode),
    "posted.lists": _posted,
}


def run(name: str, examples: int) -> None:
    body = DECODERS[name]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        with contextlib.suppress(AbiError):  # the one documented error
            body(data.draw)

    fuzz()


if __name__ == "__main__":  # fuzz_runner EXAMPLES NAME...: "NAME: ok" after each that held
    for name in sys.argv[2:]:
        run(name, int(sys.argv[1]))
        print(f"{name}: ok", flush=True)
