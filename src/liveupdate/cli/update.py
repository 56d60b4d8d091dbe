"""``luoctl status | load | update | wait | cancel | sessions``: talk to luod.

luod's socket is ``--socket``, else ``$LUOD_SOCKET``, else the emulated machine's
(``$LIVEUPDATE_MACHINE/run/luod.sock``), else the host's ``/run/luod/luod.sock``.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from liveupdate.abi import generations
from liveupdate.cli.common import emit, fail
from liveupdate.client import detach as detached
from liveupdate.client.luod import LuodClient
from liveupdate.client.update import admin, load_image, luod_status, run_update, wait_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints

AFTER_EXIT_TIMEOUT = 600.0  # --after-exit: how long the caller may take to end
PHASES = ("start", "prepared", "frozen", "reboot", "updated", "normal")


def _path(socket: str | None) -> str:
    if socket:
        return socket
    if os.environ.get(endpoints.SOCKET_ENV):
        return os.environ[endpoints.SOCKET_ENV]
    machine = os.environ.get("LIVEUPDATE_MACHINE")
    if machine:
        return os.path.join(os.path.abspath(machine), "run", "luod.sock")
    return endpoints.HOST_SOCKET


def _admin(socket: str | None, **kw: Any) -> LuodClient:
    return admin(_path(socket), **kw)


socket_option = click.option("--socket", default=None, help="luod's socket (see luoctl "
                              "--help for the default).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _describe(st: dict[str, Any]) -> str:
    lines = [f"luod     LUO {st['generation']}, {st['phase']}"
             + (f" ({st['busy']})" if st.get("busy") else ""),
             f"updates  {st['update']}",
             "clients  " + (", ".join(f"{c['name']} (uid {c['uid']})" for c in st["clients"])
                            or "none")]
    if st.get("loaded"):
        lines.append(f"loaded   {st['loaded']['image']} (LUO {st['loaded']['generation']})")
    if st.get("last_error"):
        lines.append(f"last     {st['last_error']}")
    return "\n".join(lines)


@click.command()
@socket_option
@json_option
def status(socket: str | None, as_json: bool) -> None:
    """Show luod's phase, its clients, the loaded next kernel and the last failure."""
    try:
        c = _admin(socket)
        st = c.status()
        c.close()
    except LiveUpdateError as e:
        fail(e)
    emit(st, as_json, _describe(st))


@click.command()
@socket_option
@json_option
def sessions(socket: str | None, as_json: bool) -> None:
    """What luod preserves for whom: each client, its tokens (v3) or session (6.19+)."""
    try:
        c = _admin(socket)
        got = c.request("sessions")[0]["clients"]
        c.close()
    except LiveUpdateError as e:
        fail(e)
    human = "\n".join(f"{r['name']} (uid {r['uid']}): "
                      + (f"session {r['session']}" if r["session"] else
                         ", ".join(f"{k}->{v}" for k, v in r["tokens"].items()) or "nothing")
                      for r in got) or "no clients"
    emit(got, as_json, human)


@click.command()
@click.argument("image")
@click.option("--cmdline", default=None, help="The next kernel's command line [default: "
              "this kernel's].")
@click.option("--release", default=None, help="The next kernel's release, for an image that "
              "names no LUO generation (a real bzImage).")
@socket_option
@json_option
def load(image: str, cmdline: str | None, release: str | None, socket: str | None,
         as_json: bool) -> None:
    """Load the next kernel (kexec_file_load) after checking it can read this handover, and
    say what the update will do: a native handover (every format the same as Linux would
    write), a negotiated one (this kernel runs with liveupdate_negotiate=on: the formats
    both kernels agreed on), or refused, with why and what Linux would do instead (cold
    boot, panic, EIO, unreachable files).

    IMAGE is a path as luod sees it (on the emulated machine, relative to its disk/).
    """
    try:
        c = _admin(socket)
        got = c.request("load", image=image, cmdline=cmdline, release=release)[0]
        c.close()
    except LiveUpdateError as e:
        fail(e)
    h = got["handover"]
    emit(got, as_json, f"loaded {got['image']} (LUO {got['generation']}); {h['mode']} "
         "handover: " + generations.describe(h["formats"])
         + (f"; refused at prepare if a client preserves a file of: "
            f"{generations.describe(got['lacks'])}" if got.get("lacks") else "")
         + (f"; warning: {got['warning']}" if got.get("warning") else ""))


@click.command()
@socket_option
@json_option
def cancel(socket: str | None, as_json: bool) -> None:
    """Cancel an update in progress: every client resumes, nothing stays preserved."""
    try:
        c = _admin(socket)
        st = c.request("cancel")[0]
        c.close()
    except LiveUpdateError as e:
        fail(e)
    emit(st, as_json, _describe(st))


def phase_table(timeline: dict[str, float]) -> Table:
    t = Table(title="live update")
    for col in ("phase", "start (s)", "duration (s)"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    names = {"start": "Normal (preparing)", "prepared": "Prepared", "frozen": "Frozen",
             "reboot": "kexec + next kernel boot + luod", "updated": "Updated (restore)",
             "normal": "Normal"}
    steps = [p for p in PHASES if p in timeline]
    base = timeline.get("start", 0.0)
    for i, p in enumerate(steps):
        nxt = timeline[steps[i + 1]] if i + 1 < len(steps) else None
        dur = f"{nxt - timeline[p]:.3f}" if nxt is not None else ""
        t.add_row(names[p], f"{timeline[p] - base:.3f}", dur)
    return t


@click.command()
@click.option("--image", default=None, help="Load this image first (else the loaded one).")
@click.option("--cmdline", default=None, help="With --image: the next command line.")
@click.option("--release", default=None, help="With --image: its release (real bzImage).")
@click.option("--detach", "state_dir", default=None, metavar="DIR",
              help="Pre-flight (load --image, or check one is loaded), then run the update "
                   "in a process of its own session that outlives this one, its output in "
                   "DIR/update-N.log and its record in DIR/update-N.json; print N and "
                   "return. `luoctl wait --update N` follows it (after the reboot, on a "
                   "real host).")
@click.option("--after-exit", "after", type=click.IntRange(1), default=None, metavar="PID",
              help="With --detach: the update waits for process PID to end first (the "
                   "caller, so its answer leaves the host before the kexec ends the "
                   "connection).")
@socket_option
@json_option
def update(image: str | None, cmdline: str | None, release: str | None,
           state_dir: str | None, after: int | None, socket: str | None,
           as_json: bool) -> None:
    """Live-update: prepare every client, freeze, kexec, and follow the next kernel's luod
    until every client has its resources back; then print the phase table.

    A live display shows the phase and the elapsed time on a terminal. Exit status 1, with
    the reason on one line, when the update was refused or cancelled.

    On a real host the kexec ends this process with the kernel it ran on: once luod is
    frozen it says so (standard output; not with --json, whose output stays one JSON
    document), with the `luoctl wait --update N` that reports the outcome from the next
    kernel. A script remembers `luoctl status --json`'s "update" before, and runs `luoctl
    wait --update N` (N = that + 1) after the reboot -- or runs `luoctl update --detach
    DIR`, which does the first half for it in a process that outlives an SSH connection,
    then `luoctl wait --update N --detached DIR`.
    """
    if state_dir is not None:
        _start_detached(state_dir, image, cmdline, release, socket, as_json, after)
        return
    if after is not None and not detached.wait_exit(after, AFTER_EXIT_TIMEOUT):
        fail(LiveUpdateError(err=errno.ETIMEDOUT, msg=f"process {after} still runs after "
                             f"{AFTER_EXIT_TIMEOUT:g} s: no update started"))
    console = Console(stderr=True)
    t0 = time.monotonic()
    shown = {"phase": "normal"}
    live = Live(console=console, transient=True, auto_refresh=True) \
        if console.is_terminal and not as_json else None

    def progress(ev: dict[str, Any]) -> None:
        shown["phase"] = ev["phase"]
        if live is not None:
            live.update(f"[bold]{ev['phase']}[/] {time.monotonic() - t0:.2f}s")
        if ev["phase"] == "frozen" and not as_json:  # on a real host the kexec may end
            # this process now: say how to follow it (on stdout: stderr is for the error)
            click.echo(f"update {ev['update']}: frozen, the kexec follows; if this process "
                       f"ends with its kernel, `luoctl wait --update {ev['update']}` in the "
                       "next one reports the outcome")
            sys.stdout.flush()

    try:
        if live is not None:
            live.start()
        st, report = run_update(_path(socket), image=image, cmdline=cmdline,
                                release=release, on_phase=progress)
    except LiveUpdateError as e:
        fail(e)
    finally:
        if live is not None:
            live.stop()
    if as_json:
        emit({"status": st, "report": report}, True, "")
        return
    Console().print(phase_table(report.get("timeline", {})))
    click.echo(f"update {st['update']} done; FINISH: {report.get('finish', '?')}")
    if st.get("last_error"):
        click.echo(f"note: {st['last_error']}", err=True)
    sys.stdout.flush()


def _start_detached(state_dir: str, image: str | None, cmdline: str | None,
                    release: str | None, socket: str | None, as_json: bool,
                    after: int | None) -> None:
    """``luoctl update --detach DIR`` (:mod:`liveupdate.client.detach`)."""
    path = _path(socket)
    try:
        handover = None
        if image is not None:  # luod's pre-flight: refused here, the host is untouched
            handover = load_image(path, image, cmdline, release)["handover"]
        st = luod_status(path)
        if st["phase"] != "normal" or st.get("busy"):
            raise LiveUpdateError(err=errno.EBUSY, msg=f"luod is {st['phase']}"
                                  + (f" ({st['busy']})" if st.get("busy") else "")
                                  + ": no update can start now")
        if not st.get("loaded"):
            raise LiveUpdateError(err=errno.ENOENT, msg="no next kernel is loaded: give "
                                  "--image (or `luoctl load IMAGE` first)")
        number = int(st["update"]) + 1
        argv = [sys.executable, "-m", "liveupdate.cli.luoctl", "update", "--json",
                "--socket", path, *(["--after-exit", str(after)] if after else [])]
        rec = detached.spawn(argv, state_dir, number, {
            "socket": path, "image": st["loaded"].get("image"),
            "generation_before": st["generation"], "boot_id_before": st.get("boot_id"),
            **({"handover": handover} if handover is not None else {})})
    except LiveUpdateError as e:
        fail(e)
    emit(rec, as_json, f"update {number} started (pid {rec['pid']}, log {rec['log']}); "
         f"`luoctl wait --update {number}` reports its outcome")


@click.command()
@click.option("--update", "number", type=click.IntRange(1), default=None,
              help="The update to wait for (luod's count before `luoctl update`, plus one) "
                   "[default: the latest].")
@click.option("--timeout", type=click.FloatRange(0), default=300.0, show_default=True,
              help="Seconds to wait for luod to listen, and as long for it to FINISH.")
@click.option("--detached", "state_dir", default=None, metavar="DIR",
              help="Update N was started with `luoctl update --detach DIR`: while luod "
                   "still runs the kernel it started on, wait for that process first; on "
                   "failure, say the last line of its log.")
@socket_option
@json_option
def wait(number: int | None, timeout: float, state_dir: str | None, socket: str | None,
         as_json: bool) -> None:
    """Wait for luod -- in the next kernel, after a kexec -- to finish an update, and report
    its outcome as `luoctl update` does (--json: the same {"status", "report"}).

    On a real host the kexec ends `luoctl update` with the kernel it ran on; a script runs
    `luoctl wait --update N` after the reboot to follow the update to its end. Exit status 1,
    with luod's reason on one line, when update N did not happen (refused or cancelled).
    """
    if state_dir is not None and number is None:
        fail(LiveUpdateError(err=errno.EINVAL, msg="--detached needs --update N"))
    rec: dict[str, Any] = {}
    try:
        if state_dir is not None and number is not None:
            rec = detached.settle(state_dir, number, _boot_id(_path(socket)), timeout)
        st, report = wait_update(_path(socket), number, timeout)
    except LiveUpdateError as e:
        if state_dir is not None and number is not None and not rec:
            rec = _quiet_record(state_dir, number)
        fail(f"{e}" + (f"; its log says: {rec['last_line']}" if rec.get("last_line") else ""))
    if as_json:
        emit({"status": st, "report": report}, True, "")
        return
    if report:
        Console().print(phase_table(report.get("timeline", {})))
    click.echo(f"update {report.get('update', st['update'])} done; FINISH: "
               f"{report.get('finish', '? (finished by an earlier luod)')}")
    if st.get("last_error"):
        click.echo(f"note: {st['last_error']}", err=True)


def _boot_id(path: str) -> str | None:
    """luod's kernel's boot id; None while no luod answers (between kernels)."""
    try:
        return str(luod_status(path).get("boot_id") or "") or None
    except LiveUpdateError:
        return None


def _quiet_record(state_dir: str, number: int) -> dict[str, Any]:
    try:
        return detached.record(state_dir, number)
    except LiveUpdateError:
        return {}
