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

from liveupdate.cli.common import SizeParam, emit, fail
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient, start


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
    each boot runs one kernel process, replaced at every kexec. Its folder keeps a disk
    (kernel images in disk/images/, the init services list disk/services) and a run/ folder
    with the control socket and console.log.
    """
    ctx.obj = {"dir": folder}


@machine.command("start")
@click.option("--memory", type=SizeParam(), default="4G", show_default=True, help="RAM size.")
@click.option("--image", default="", help="Kernel image, relative to disk/ "
              "[default: images/default.img].")
@click.option("--cmdline", default="kho=on", show_default=True, help="Kernel command line.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def start_cmd(ctx: click.Context, memory: int, image: str, cmdline: str, as_json: bool) -> None:
    """Start the machine in the background and cold-boot it.

    Returns once the kernel has booted (or fails, with the console's last lines).
    """
    folder = ctx.obj["dir"]
    try:
        if os.path.exists(os.path.join(folder, "run", "control.sock")):
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
@click.pass_context
def kexec_load(ctx: click.Context, image: str, cmdline: str | None, append: str) -> None:
    """Load IMAGE (relative to disk/) with kexec_file_load."""
    argv = [sys.executable, "-m", "liveupdate.cli.kexec", "-l", image]
    if cmdline is not None:
        argv += ["--command-line", cmdline]
    if append:
        argv += ["--append", append]
    try:
        r = _client(ctx).run(argv)
    except LiveUpdateError as e:
        fail(e)
    if r["status"]:
        fail(r["stderr"].strip())
    click.echo(r["stdout"].strip())


@kexec.command("exec")
@click.option("--json", "as_json", is_flag=True, help="Print the new status as JSON.")
@click.pass_context
def kexec_exec(ctx: click.Context, as_json: bool) -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC) into the loaded image; wait for it to boot."""
    c = _client(ctx)
    try:
        r = c.run([sys.executable, "-m", "liveupdate.cli.kexec", "-e"])
        fail(r["stderr"].strip() or "kexec -e returned")
    except LiveUpdateError as e:
        if e.errno != errno.EIO:  # the kernel went away, as it should
            fail(e)
    try:
        st = c.booted(120)
    except LiveUpdateError as e:
        fail(e)
    emit(st, as_json, _describe(st))


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
