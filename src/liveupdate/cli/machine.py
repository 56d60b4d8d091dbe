"""``luoctl machine``: run and drive an emulated machine."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys
from pathlib import Path
from typing import Any

import click

from liveupdate.cli.common import PhysParam, SizeParam, emit, fail
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient, start
from liveupdate.machine.machine import DEFAULT_CMDLINE


def _client(ctx: click.Context) -> MachineClient:
    return MachineClient(ctx.obj["dir"])


def _describe(st: dict[str, Any]) -> str:
    k = st.get("kernel") or {}
    lines = [f"machine  {st['dir']}", f"state    {st['state']}"
             + (f" ({st['reason']})" if st.get("reason") else "")]
    if st.get("memory"):
        lines.append(f"memory   {st['memory'] >> 20} MiB ({st['ram_resident'] >> 20} MiB "
                     "resident)")
    if k:
        lines.append(f"kernel   {k.get('release')} pid {st['kernel_pid']} boot "
                     f"{st['boot_count']} ({'KHO boot' if k.get('kho_boot') else 'cold boot'})")
    return "\n".join(lines)


@click.group()
@click.option("--dir", "folder", envvar="LIVEUPDATE_MACHINE", default=".machine",
              show_default=True, type=click.Path(file_okay=False),
              help="The machine's folder (disk/ and run/); env LIVEUPDATE_MACHINE.")
@click.pass_context
def machine(ctx: click.Context, folder: str) -> None:
    """Run and drive an emulated machine.

    A machine is a process that owns RAM (a sparse memfd), firmware, a console and power;
    each boot runs one kernel process, replaced at every kexec. Its folder keeps the control
    socket, console.log and machine.log (the machine's: no kernel or userspace sees them), a
    disk (kernel images in disk/images/, the init services list disk/services) and run/ (the
    kernel's tmpfs, emptied at every boot).
    """
    ctx.obj = {"dir": folder}


@machine.command("start")
@click.option("--memory", type=SizeParam(), default="4G", show_default=True, help="RAM size.")
@click.option("--image", default="", help="Kernel image, relative to disk/ "
              "[default: images/default.img].")
@click.option("--cmdline", default=DEFAULT_CMDLINE, show_default=True,
              help="Kernel command line.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def start_cmd(ctx: click.Context, memory: int, image: str, cmdline: str, as_json: bool) -> None:
    """Start the machine in the background and cold-boot it.

    Returns once the kernel has booted (or fails, with the console's last lines).
    """
    folder = ctx.obj["dir"]
    try:
        if os.path.exists(os.path.join(folder, "control.sock")):
            with contextlib.suppress(LiveUpdateError):  # a stale socket: that machine is gone
                st = MachineClient(folder).status()
                fail(f"a machine is already running in {folder} ({st['state']})")
        log = os.path.join(folder, "machine.log")
        os.makedirs(folder, exist_ok=True)
        _, client = start(folder, memory=memory, image=image, cmdline=cmdline, detach=True,
                          log=log)
        st = client.booted(120)
    except LiveUpdateError as e:
        fail(e)
    emit(st, as_json, _describe(st))


@machine.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the machine's state, memory and running kernel."""
    try:
        st = _client(ctx).status()
    except LiveUpdateError as e:
        fail(e)
    emit(st, as_json, _describe(st))


@machine.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output, like tail -f.")
@click.option("--offset", type=int, default=0, help="Start at this byte of the console.")
@click.pass_context
def console(ctx: click.Context, follow: bool, offset: int) -> None:
    """Print the console (every kernel's output since power-on)."""
    c = _client(ctx)
    try:
        while True:
            end, data = c.console(offset)
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()
            offset = end
            if not follow:
                return
            try:
                c.wait(r"[\s\S]", offset=offset, timeout=3600)
            except LiveUpdateError as e:
                if e.errno != errno.ETIMEDOUT:  # keep following
                    raise
    except LiveUpdateError as e:
        fail(e)
    except KeyboardInterrupt:
        return


@machine.group()
def kexec() -> None:
    """Load and execute the next kernel (runs the kexec tool inside the machine)."""


@kexec.command("load")
@click.argument("image", default="images/default.img")
@click.option("--cmdline", default=None, help="Replace the command line (default: reuse).")
@click.option("--append", default="", help="Words to add to the command line.")
@click.option("--kho-finalize", is_flag=True,
              help="Write 1 to kho/out/finalize first, as the KHO selftest does: 6.16-6.18 "
                   "kernels hand over nothing without it (6.18 needs it before the load), "
                   "6.19 neither unless LUO is on; 7.1 has nothing to finalize.")
@click.pass_context
def kexec_load(ctx: click.Context, image: str, cmdline: str | None, append: str,
               kho_finalize: bool) -> None:
    """Load IMAGE (relative to disk/) with kexec_file_load."""
    try:
        click.echo(_client(ctx).kexec_load(image, cmdline=cmdline, append=append,
                                           finalize=kho_finalize))
    except LiveUpdateError as e:
        fail(e)


@kexec.command("exec")
@click.option("--json", "as_json", is_flag=True, help="Print the new status as JSON.")
@click.pass_context
def kexec_exec(ctx: click.Context, as_json: bool) -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC) into the loaded image; wait for it to boot."""
    try:
        st = _client(ctx).kexec_exec(120)
    except LiveUpdateError as e:
        fail(e)
    emit(st, as_json, _describe(st))


def hexdump(phys: int, data: bytes) -> str:
    """16 bytes a line: address, hex bytes, printable ASCII (as xxd and QEMU's xp)."""
    lines = []
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{phys + off:#018x}: {row.hex(' '):<47}  |{text}|")
    return "\n".join(lines)


@machine.group()
def memory() -> None:
    """Read and write the machine's physical memory (the RAM debug port).

    As QEMU's monitor has xp and pmemsave: RAM is every physical address below the machine's
    memory size, the e820 hole below 1 MiB included. An access outside RAM fails with one
    line and a non-zero status and changes nothing. Only host-side tools have this port; the
    machine's own kernels and their userspace are refused.
    """


@memory.command("read")
@click.argument("phys", type=PhysParam())
@click.argument("size", type=PhysParam())
@click.option("--raw", is_flag=True, help="Write the bytes to standard output as they are.")
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True),
              help="Write the bytes to FILE (like pmemsave).")
@click.pass_context
def memory_read(ctx: click.Context, phys: int, size: int, raw: bool, out: str | None) -> None:
    """Read SIZE bytes of RAM at physical address PHYS (hex dump by default).

    \b
    Examples:
      luoctl machine memory read 0x9f000 64
      luoctl machine memory read 0x1000000 16M --out kernel.bin
    """
    try:
        data = _client(ctx).ram_read(phys, size)
    except LiveUpdateError as e:
        fail(e)
    if out:
        Path(out).write_bytes(data)
        click.echo(f"wrote {len(data)} bytes from {phys:#x} to {out}")
    elif raw:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        click.echo(hexdump(phys, data))


@memory.command("write")
@click.argument("phys", type=PhysParam())
@click.argument("hexbytes", required=False)
@click.option("--file", "file", type=click.Path(dir_okay=False, exists=True),
              help="Write the contents of FILE instead of HEXBYTES.")
@click.pass_context
def memory_write(ctx: click.Context, phys: int, hexbytes: str | None, file: str | None) -> None:
    """Write HEXBYTES (e.g. 4b484f21 or "4b 48 4f 21") or --file FILE at physical PHYS.

    \b
    Examples:
      luoctl machine memory write 0x9f100 deadbeef
      luoctl machine memory write 0x20000000 --file marker.bin
    """
    if (hexbytes is None) == (file is None):
        fail("give either HEXBYTES or --file")
    if file is not None:
        data = Path(file).read_bytes()
    else:
        try:
            data = bytes.fromhex(str(hexbytes).removeprefix("0x"))
        except ValueError:
            fail(f"{hexbytes!r} is not hex bytes")
    try:
        _client(ctx).ram_write(phys, data)
    except LiveUpdateError as e:
        fail(e)
    click.echo(f"wrote {len(data)} bytes at {phys:#x}")


@machine.command()
@click.argument("argv", nargs=-1, required=True)
@click.option("--timeout", type=float, default=60, show_default=True)
@click.pass_context
def run(ctx: click.Context, argv: tuple[str, ...], timeout: float) -> None:
    """Run a program as userspace of the machine's kernel; exit with its status."""
    try:
        r = _client(ctx).run(list(argv), timeout=timeout)
    except LiveUpdateError as e:
        fail(e)
    sys.stdout.write(r["stdout"])
    sys.stderr.write(r["stderr"])
    sys.exit(r["status"] if r["status"] >= 0 else 128 - r["status"])


@machine.command("power-cycle")
@click.option("--memory", type=SizeParam(), default=None, help="New RAM size [default: same].")
@click.option("--image", default=None, help="Kernel image, relative to disk/ [default: same].")
@click.option("--cmdline", default=None, help="Kernel command line [default: same].")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def power_cycle(ctx: click.Context, memory: int | None, image: str | None,
                cmdline: str | None, as_json: bool) -> None:
    """Cut power and cold-boot again (from any state, PANIC included); RAM starts empty."""
    config = {k: v for k, v in (("memory", memory), ("image", image), ("cmdline", cmdline))
              if v is not None}
    c = _client(ctx)
    try:
        st = c.status()
        c.power_cycle(**{"memory": st["memory"] or 4 << 30, **config})
        st = c.booted(120)
    except LiveUpdateError as e:
        fail(e)
    emit(st, as_json, _describe(st))


@machine.command()
@click.pass_context
def poweroff(ctx: click.Context) -> None:
    """Power the machine off and stop its process."""
    c = _client(ctx)
    try:
        pidfd = os.pidfd_open(int(c.status()["machine_pid"]))
    except (LiveUpdateError, OSError) as e:
        fail(e)
    c.shutdown()
    select.select([pidfd], [], [], 30)  # the machine process has exited
    os.close(pidfd)
    click.echo(f"machine {Path(ctx.obj['dir']).resolve()} powered off")
