"""Boot parameters: an x86 ``boot_params`` zero page, its e820 map and the ``setup_data`` chain,
plus the KHO hand-off records that ride on them (spec/kho.md 5.2-5.3).

The emulated firmware and kexec write a 4096-byte zero page whose fields we use sit at their
real x86 offsets (Documentation/arch/x86/zero-page.rst, boot.rst)::

    0x0c8 u32 ext_cmd_line_ptr     0x1e8 u8  e820_entries      0x1fe u16 boot_flag = 0xAA55
    0x202 u32 header = "HdrS"      0x206 u16 version = 0x020f   0x228 u32 cmd_line_ptr
    0x238 u32 cmdline_size         0x250 u64 setup_data        0x258 u64 pref_address
    0x2d0 e820_table[128] (20 B each)

``pref_address`` carries where the running kernel's image lies (the emulated kernel reads its
own image header there); every other byte is zero. The command line is a NUL-terminated string at
``cmd_line_ptr | ext_cmd_line_ptr << 32``. ``setup_data`` nodes are
``{u64 next; u32 type; u32 len; u8 data[len]}``; type 10 (``SETUP_KEXEC_KHO``) carries the
packed 32-byte ``struct kho_data {u64 fdt_addr, fdt_size, scratch_addr, scratch_size}``.
Device-tree architectures hand the same two ranges over as ``/chosen/linux,kho-fdt`` and
``/chosen/linux,kho-scratch`` (big-endian address/size cells).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

BOOT_PARAMS_SIZE = PAGE_SIZE
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_CMD_LINE_PTR = 0x228
OFF_CMDLINE_SIZE = 0x238
OFF_SETUP_DATA = 0x250
OFF_PREF_ADDRESS = 0x258
OFF_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_PROTOCOL_VERSION = 0x020F
CMDLINE_MAX = 2048

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_PMEM = 7
E820_TYPES = {E820_RAM: "usable", E820_RESERVED: "reserved", E820_ACPI: "ACPI data",
              E820_NVS: "ACPI NVS", E820_UNUSABLE: "unusable", E820_PMEM: "persistent"}
E820_DTYPE = np.dtype([("addr", "<u8"), ("size", "<u8"), ("type", "<u4")])

SETUP_HDR = struct.Struct("<QII")
SETUP_HDR_SIZE = SETUP_HDR.size  # 16
SETUP_KEXEC_KHO = 10
SETUP_TYPE_MAX = SETUP_KEXEC_KHO
SETUP_CHAIN_MAX = 64

KHO_DATA = struct.Struct("<QQQQ")
KHO_DATA_SIZE = KHO_DATA.size  # 32
SCRATCH_DTYPE = np.dtype([("addr", "<u8"), ("size", "<u8")])
CHOSEN_KHO_FDT = "linux,kho-fdt"
CHOSEN_KHO_SCRATCH = "linux,kho-scratch"


@dataclass(frozen=True)
class KhoData:
    fdt_addr: int
    fdt_size: int
    scratch_addr: int
    scratch_size: int

    def encode(self) -> bytes:
        if any(not 0 <= v < 1 << 64 for v in (self.fdt_addr, self.fdt_size,
                                               self.scratch_addr, self.scratch_size)):
            raise AbiError(msg="kho_data field out of u64 range")
        return KHO_DATA.pack(self.fdt_addr, self.fdt_size, self.scratch_addr, self.scratch_size)

    @classmethod
    def decode(cls, raw: bytes) -> KhoData:
        if len(raw) != KHO_DATA_SIZE:
            raise AbiError(msg=f"kho_data is {len(raw)} bytes, not {KHO_DATA_SIZE}")
        kd = cls(*KHO_DATA.unpack(raw))
        if kd.scratch_size % SCRATCH_DTYPE.itemsize:
            raise AbiError(msg=f"kho_data: scratch_size {kd.scratch_size} is not a multiple of 16")
        return kd


@dataclass(frozen=True)
class SetupData:
    phys: int
    type: int
    data: bytes


def encode_setup_data(type_: int, data: bytes, next_phys: int = 0) -> bytes:
    if not 0 <= type_ < 1 << 32 or len(data) >= 1 << 32:
        raise AbiError(msg="setup_data type or length out of range")
    return SETUP_HDR.pack(next_phys, type_, len(data)) + data


def decode_setup_data(raw: bytes, phys: int = 0) -> tuple[SetupData, int]:
    """One standalone node: (node, next). The data must be exactly ``len`` bytes."""
    if len(raw) < SETUP_HDR_SIZE:
        raise AbiError(msg=f"setup_data is {len(raw)} bytes, shorter than its 16-byte header")
    nxt, type_, length = SETUP_HDR.unpack_from(raw)
    if len(raw) != SETUP_HDR_SIZE + length:
        raise AbiError(msg=f"setup_data header says {length} data bytes, blob has "
                       f"{len(raw) - SETUP_HDR_SIZE}")
    return SetupData(phys, type_, bytes(raw[SETUP_HDR_SIZE:])), nxt


def kho_setup_data(kd: KhoData, next_phys: int = 0) -> bytes:
    return encode_setup_data(SETUP_KEXEC_KHO, kd.encode(), next_phys)


def decode_kho_setup_data(node: SetupData) -> KhoData:
    if node.type != SETUP_KEXEC_KHO:
        raise AbiError(msg=f"setup_data type {node.type} is not SETUP_KEXEC_KHO (10)")
    return KhoData.decode(node.data)


def read_setup_chain(mem: PhysMem, first: int) -> list[SetupData]:
    """Follow a ``setup_data`` chain in RAM; loops and overlong chains are errors."""
    nodes: list[SetupData] = []
    phys = first
    while phys:
        if len(nodes) >= SETUP_CHAIN_MAX or any(n.phys == phys for n in nodes):
            raise AbiError(msg=f"setup_data chain loops or exceeds {SETUP_CHAIN_MAX} nodes")
        nxt, type_, length = SETUP_HDR.unpack(mem.read(phys, SETUP_HDR_SIZE, "setup_data"))
        if length > PAGE_SIZE * 16:
            raise AbiError(msg=f"setup_data at {phys:#x}: implausible length {length}")
        nodes.append(SetupData(phys, type_, mem.read(phys + SETUP_HDR_SIZE, length,
                                                     "setup_data payload")))
        phys = nxt
    return nodes


def encode_scratch(addr: np.ndarray, size: np.ndarray) -> bytes:
    """The KHO scratch array: 16-byte ``{addr, size}`` entries."""
    arr = np.zeros(len(addr), dtype=SCRATCH_DTYPE)
    arr["addr"], arr["size"] = addr, size
    return arr.tobytes()


def decode_scratch(raw: bytes) -> np.ndarray:
    if len(raw) == 0 or len(raw) % SCRATCH_DTYPE.itemsize:
        raise AbiError(
            msg=f"KHO scratch array of {len(raw)} bytes is not a whole number of entries")
    arr = np.frombuffer(raw, dtype=SCRATCH_DTYPE)
    if np.any(arr["addr"] + arr["size"] < arr["addr"]):
        raise AbiError(msg="KHO scratch area wraps past 2^64")
    return arr


def scratch_areas(arr: np.ndarray) -> list[tuple[int, int]]:
    """A decoded scratch array as ``(addr, size)`` pairs."""
    return list(zip(arr["addr"].tolist(), arr["size"].tolist(), strict=True))


def encode_chosen_range(addr: int, size: int, addr_cells: int = 2, size_cells: int = 2) -> bytes:
    """``fdt_appendprop_addrrange``: big-endian cells sized by the root's #cells."""
    out = b""
    for value, cells in ((addr, addr_cells), (size, size_cells)):
        if cells not in (1, 2) or value >= 1 << (32 * cells) or value < 0:
            raise AbiError(msg=f"value {value:#x} does not fit {cells} cells")
        out += value.to_bytes(4 * cells, "big")
    return out


def decode_chosen_range(raw: bytes, addr_cells: int = 2, size_cells: int = 2) -> tuple[int, int]:
    """``early_init_dt_check_kho``: exact length required."""
    want = 4 * (addr_cells + size_cells)
    if addr_cells not in (1, 2) or size_cells not in (1, 2):
        raise AbiError(msg="#address-cells and #size-cells must be 1 or 2")
    if len(raw) != want:
        raise AbiError(msg=f"/chosen KHO property is {len(raw)} bytes, not {want}")
    return (int.from_bytes(raw[: 4 * addr_cells], "big"),
            int.from_bytes(raw[4 * addr_cells :], "big"))


@dataclass
class BootParams:
    e820: np.ndarray = field(default_factory=lambda: np.zeros(0, E820_DTYPE))
    cmd_line_ptr: int = 0
    cmdline_size: int = CMDLINE_MAX
    setup_data: int = 0
    kernel_addr: int = 0

    def encode(self) -> bytes:
        if len(self.e820) > E820_MAX_ENTRIES_ZEROPAGE:
            raise AbiError(msg=f"{len(self.e820)} e820 entries, more than "
                           f"{E820_MAX_ENTRIES_ZEROPAGE}")
        page = bytearray(BOOT_PARAMS_SIZE)
        struct.pack_into("<I", page, OFF_EXT_CMD_LINE_PTR, self.cmd_line_ptr >> 32)
        page[OFF_E820_ENTRIES] = len(self.e820)
        struct.pack_into("<H", page, OFF_BOOT_FLAG, BOOT_FLAG)
        struct.pack_into("<IH", page, OFF_HEADER, HDRS_MAGIC, BOOT_PROTOCOL_VERSION)
        struct.pack_into("<I", page, OFF_CMD_LINE_PTR, self.cmd_line_ptr & 0xFFFFFFFF)
        struct.pack_into("<I", page, OFF_CMDLINE_SIZE, self.cmdline_size)
        struct.pack_into("<Q", page, OFF_SETUP_DATA, self.setup_data)
        struct.pack_into("<Q", page, OFF_PREF_ADDRESS, self.kernel_addr)
        table = np.asarray(self.e820, dtype=E820_DTYPE).tobytes()
        page[OFF_E820_TABLE : OFF_E820_TABLE + len(table)] = table
        return bytes(page)

    @classmethod
    def decode(cls, raw: bytes) -> BootParams:
        if len(raw) != BOOT_PARAMS_SIZE:
            raise AbiError(msg=f"boot_params is {len(raw)} bytes, not {BOOT_PARAMS_SIZE}")
        (flag,) = struct.unpack_from("<H", raw, OFF_BOOT_FLAG)
        magic, _version = struct.unpack_from("<IH", raw, OFF_HEADER)
        if flag != BOOT_FLAG or magic != HDRS_MAGIC:
            raise AbiError(msg="boot_params: missing boot_flag 0xAA55 or \"HdrS\" header")
        n = raw[OFF_E820_ENTRIES]
        if n > E820_MAX_ENTRIES_ZEROPAGE:
            raise AbiError(msg=f"boot_params: e820_entries {n} > {E820_MAX_ENTRIES_ZEROPAGE}")
        e820 = np.frombuffer(raw, E820_DTYPE, count=n, offset=OFF_E820_TABLE).copy()
        if np.any(e820["addr"] + e820["size"] < e820["addr"]):
            raise AbiError(msg="boot_params: an e820 entry wraps past 2^64")
        (ext,) = struct.unpack_from("<I", raw, OFF_EXT_CMD_LINE_PTR)
        (ptr,) = struct.unpack_from("<I", raw, OFF_CMD_LINE_PTR)
        (size,) = struct.unpack_from("<I", raw, OFF_CMDLINE_SIZE)
        (sd,) = struct.unpack_from("<Q", raw, OFF_SETUP_DATA)
        (kaddr,) = struct.unpack_from("<Q", raw, OFF_PREF_ADDRESS)
        return cls(e820, ptr | ext << 32, size, sd, kaddr)

    def ram_ranges(self) -> list[tuple[int, int]]:
        ram = self.e820[self.e820["type"] == E820_RAM]
        return [(int(a), int(s)) for a, s in zip(ram["addr"], ram["size"], strict=True)]

    def read_cmdline(self, mem: PhysMem) -> str:
        if not self.cmd_line_ptr:
            return ""
        limit = min(self.cmdline_size or CMDLINE_MAX, CMDLINE_MAX)
        n = min(limit, mem.room(self.cmd_line_ptr))
        raw = mem.read(self.cmd_line_ptr, n, "command line") if n else b""
        if b"\0" not in raw:
            raise AbiError(msg="boot_params: command line is not NUL-terminated within its size")
        try:
            return raw[: raw.index(b"\0")].decode()
        except UnicodeDecodeError as e:
            raise AbiError(msg="boot_params: command line is not valid UTF-8") from e
