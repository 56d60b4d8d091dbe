"""``luoctl inspect``, ``capture`` and ``example``: handover data as files -- decoded,
captured from an emulated kernel at the jump, or written as an example."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import click

from liveupdate.abi import generations
from liveupdate.abi.generations import RELEASES as GENERATIONS
from liveupdate.abi.physmem import PhysMem
from liveupdate.cli.common import PageAddrParam, SizeParam, fail
from liveupdate.cli.render import exit_with_report
from liveupdate.errors import LiveUpdateError
from liveupdate.tools import example as example_mod
from liveupdate.tools import extract as extract_mod
from liveupdate.tools import inspect as inspect_mod
from liveupdate.tools import ramfile


@click.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ram", "ram", type=click.Path(dir_okay=False, path_type=Path), metavar="RAM",
              help="Guest RAM: a raw image (file offset == physical address) or a QEMU "
                   "dump-guest-memory ELF core. Pointers are followed through it; without "
                   "FILE, the KHO root is found by scanning it.")
@click.option("--root", "root_addr", type=PageAddrParam(), default=None,
              help="With --ram and no FILE: decode the KHO root FDT at this physical address "
                   "instead of choosing one by scanning.")
@click.option("--extract", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR",
              help="With --ram: write every preserved memfd to DIR/<session>/<token>.bin "
                   "(sparse) and DIR/manifest.json (size, pos, seals, sha256 of each; other "
                   "files as skipped). DIR must not exist, or be empty.")
@click.option("--bitmap-bytes", type=click.Choice(["auto", "4096", "512"]), default="auto",
              show_default=True,
              help="Size of kho-v1 bitmaps: 4096 (6.18+), 512 (6.16/6.17), or detect.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(file: Path | None, ram: Path | None, root_addr: int | None, extract: Path | None,
            bitmap_bytes: str, as_json: bool) -> None:
    """Decode a KHO/LUO handover: a blob, a RAM image, or both.

    FILE is recognized by its content, whatever its name:

    \b
      KHO root FDT     kho-v1, kho-v3, kho-v4 (debugfs in/fdt, out/fdt)
      setup_data       a SETUP_KEXEC_KHO node with its 16-byte header, or the
                       bare 32-byte struct kho_data that
                       /sys/kernel/boot_params/setup_data/N/data exports
                       (the N whose type file reads 0xa)
      LUO state        a raw luo_ser ("luo-v5", 32 bytes) or a luo-v1 FDT
      other subtrees   kexec-metadata (73 bytes), memblock-v1, kho-test-v1,
                       file-descriptors-v1, FDT memfd-v1

    Files of /sys/kernel/debug/kho/ are read as Linux 7.3 exports them. out/fdt
    keeps the size the root had at fs_initcall, so the nodes added later are cut
    off: what is there is decoded, property names lost with the strings block are
    inferred (and said to be), and the report lists what could not be read.
    out/sub_fdts/LUO shows sessions_pa = 0 until reboot(): LUO serializes its
    sessions only then. in/sub_fdts/* point at pages their owners may have freed
    since (LUO frees its own at boot): a blob from in/ that does not decode, or
    points at garbage, is explained as stale.

    With --ram, every pointer is followed: scratch areas, the preserved-memory
    map (blocks per order, merged ranges; a block outside RAM is an error), every
    subtree, LUO sessions and files, memfd folios, vmalloc arrays. RAM is a raw
    image (file offset == physical address) or the ELF core of QEMU's
    dump-guest-memory (its PT_LOADs map physical addresses into the file, which
    is mapped, never read whole). Without FILE, every page of RAM is searched for
    a KHO root FDT: the report lists each candidate, the one chosen and why
    (--root ADDR overrides the choice).

    --extract DIR writes the contents of every preserved memfd (LUO sessions of
    6.19 to 7.3, and the v3 postings' files) to DIR/<session>/<token>.bin --
    sparse, each file the memfd's size -- and DIR/manifest.json with session,
    token, size, pos, seals, nr_folios and sha256 of each; files of other kinds
    have no contents to write and are listed as skipped, with why. DIR must not
    exist or be an empty directory. Nothing is written unless every folio checks
    out against the KHO memory map, RAM and the file, and then all or nothing:
    the files go to a directory beside DIR, renamed to DIR at the end, and a
    write that fails (ENOSPC...) leaves nothing, its errno in the report's
    extract entry. A root with no LUO subtree has nothing to extract: the
    report says so, and that alone is not an error.

    Exit status: 0 when everything that is there decoded (a truncated debugfs
    blob is reported, not an error: what was cut off is listed as unreadable),
    1 on any error (errors met while following a pointer are shown in place, and
    everything else that decoded is still printed), 2 on bad usage.

    \b
    Examples:
      # a running 7.3 kernel's debugfs
      luoctl inspect /sys/kernel/debug/kho/out/fdt
      luoctl inspect /sys/kernel/debug/kho/out/sub_fdts/LUO
      # the next kernel's setup_data, with RAM saved at the jump
      luoctl inspect /sys/kernel/boot_params/setup_data/1/data --ram ram.raw
      # what luoctl capture writes (setup_data with its header)
      luoctl inspect --ram DIR/ram.img DIR/setup_data.bin --json
      # RAM alone, raw or a QEMU core: the root is found by scanning
      luoctl inspect --ram ram.raw
      luoctl inspect --ram ram.elf --root 0x54a000
      # every preserved memfd, out of a QEMU core
      luoctl inspect --ram ram.elf --extract /tmp/memfds
    """
    if file is None and ram is None:
        raise click.UsageError("give FILE, --ram RAM, or both")
    if ram is None and (extract is not None or root_addr is not None):
        raise click.UsageError("--extract and --root need --ram")
    if file is not None and root_addr is not None:
        raise click.UsageError("--root chooses the root when there is no FILE")
    bb = None if bitmap_bytes == "auto" else int(bitmap_bytes)
    try:
        if ram is None:
            report, _ = inspect_mod.run(file, None, None, bb)
        else:
            with ramfile.open_ram(ram) as (mem, info):
                report, root = inspect_mod.run(file, mem, info, bb, root_addr)
                if extract is not None:
                    report["extract"] = _extract(mem, root, extract, bb)
    except (LiveUpdateError, OSError, ValueError) as e:
        fail(e)
    exit_with_report(str(file or ram), report, as_json)


def _extract(mem: PhysMem, root: bytes | None, out: Path, bb: int | None) -> dict[str, Any]:
    if root is None:
        return {"error": "--extract needs the KHO root: give setup_data, a root FDT, or no "
                         "FILE (RAM is scanned for it)"}
    try:
        return extract_mod.extract(mem, root, out, bb)
    except LiveUpdateError as e:  # a failed write included: the report is still shown
        return {"error": f"nothing written: {e}", "errno": e.errno_name}
    except OSError as e:  # e.g. DIR's parent unreadable: check_target's lstat
        return {"error": f"nothing written: {e}",
                "errno": errno.errorcode.get(e.errno or 0, str(e.errno))}


@click.command()
@click.option("--from", "writer", type=click.Choice(list(GENERATIONS)), default="7.2",
              show_default=True, help="The kernel generation that hands over.")
@click.option("--to", "reader", type=click.Choice(list(GENERATIONS)), default=None,
              help="The generation it loads [default: --from].")
@click.option("--negotiate", is_flag=True,
              help="Boot with liveupdate_negotiate=on: the formats are agreed with --to.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for ram.img (sparse) and setup_data.bin.")
@click.option("--memory", type=SizeParam(), default="1G", show_default=True,
              help="RAM size of the in-process machine.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def capture(writer: str, reader: str | None, negotiate: bool, out: Path, memory: int,
            as_json: bool) -> None:
    """Capture a real kernel's handover at the jump, for `luoctl inspect --ram`.

    Boots the --from generation in process (the emulated kernel's own code, on real RAM) with
    test_kho=1 and, where it has LUO, one preserved memfd; loads the --to generation; runs
    the reboot path to the jump; writes the RAM as the next kernel finds it (sparse) and the
    SETUP_KEXEC_KHO node. A load the kernel refuses (an incompatible --to, or nothing in
    common with --negotiate) is an error with the kernel's reason.

    \b
    Example:
      luoctl capture --from 7.2 --to 6.19 --negotiate --out /tmp/h
      luoctl inspect --ram /tmp/h/ram.img /tmp/h/setup_data.bin
    """
    from liveupdate.scenario import capture as capture_mod

    try:
        got = capture_mod.capture(writer, reader or writer, out, negotiate=negotiate,
                                  memory=memory)
    except (LiveUpdateError, OSError) as e:
        fail(e)
    info = {"ram": str(got.ram), "setup_data": str(got.setup_data), "from": writer,
            "to": reader or writer, "ram_size": got.ram_size, "handover": got.handover}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        h = got.handover
        click.echo(f"wrote {got.ram} and {got.setup_data}: {writer} -> {reader or writer}, "
                   f"{h['mode']} handover ({generations.describe(h['formats'])})")


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for ram.img (sparse) and setup_data.bin.")
@click.option("--generation", type=click.Choice(example_mod.GENERATIONS), default="6.19",
              show_default=True, help="LUO era of the handover.")
@click.option("--memory", type=SizeParam(), default="1G", show_default=True,
              help="RAM size (the image is sparse: only written pages use disk).")
@click.option("--vm-memory", type=SizeParam(), default="16M", show_default=True,
              help="Size of the preserved memfd (2 MiB folios).")
@click.option("--bitmap-bytes", type=click.Choice(["4096", "512"]), default="4096",
              show_default=True, help="kho-v1 bitmap size to serialize with.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def example(out: Path, generation: str, memory: int, vm_memory: int, bitmap_bytes: str,
            as_json: bool) -> None:
    """Write an example handover as an outgoing kernel leaves it in RAM at kexec.

    The RAM image holds boot parameters, a SETUP_KEXEC_KHO setup_data node, the KHO root FDT
    with memblock, kho_test and LUO subtrees, the serialized memory map and a memfd of VM
    memory. setup_data.bin is a copy of the setup_data node, the entry point for
    `luoctl inspect --ram`.
    """
    try:
        ex = example_mod.build(generation, memory, vm_memory >> 20, int(bitmap_bytes))
        ram_path = example_mod.write(ex, out)
    except (LiveUpdateError, OSError) as e:
        fail(e)
    info = {"ram": str(ram_path), "setup_data": str(out / "setup_data.bin"),
            "generation": generation, "ram_size": ex.ram_size,
            "boot_params": f"{ex.boot_params_phys:#x}", "preserved_pages": ex.preserved_pages}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"wrote {ram_path} ({ex.ram_size >> 20} MiB sparse, LUO {generation}, "
                   f"{ex.preserved_pages} preserved pages, boot params at "
                   f"{ex.boot_params_phys:#x}) and {out / 'setup_data.bin'}", err=True)

