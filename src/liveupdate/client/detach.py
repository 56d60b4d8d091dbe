"""A live update started so that it outlives whoever asked for it (``luoctl update
--detach DIR``, what the fleet's Ansible module runs on a real host).

On a real host the kexec ends the kernel, and with it every process of its userspace: the
SSH connection, the Ansible module, and ``luoctl update`` itself. So the module cannot wait
for the update; it starts ``luoctl update --json`` detached -- its own session (no SIGHUP
when the connection's session ends), stdin from /dev/null, stdout and stderr to a log file
(nothing of the caller's kept open, so the caller's reader sees end of file at once) -- and
returns the update's number, N = luod's count + 1. After the reboot, ``luoctl wait --update
N`` in the next kernel reports the outcome. In ``DIR``:

* ``update-N.json`` -- the record: the number, the detached process's pid, its log, the
  command, the time it started, luod's boot id before (written whole, then renamed: a reader
  never sees half of it);
* ``update-N.log`` -- what ``luoctl update --json`` printed (its JSON outcome, or its one
  line of error), as far as it got before its kernel ended.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import time
from typing import Any

from liveupdate import jsonfile
from liveupdate.errors import LiveUpdateError


def paths(state_dir: str, number: int) -> tuple[str, str]:
    """(record, log) of update ``number`` in ``state_dir``."""
    base = os.path.join(os.path.abspath(state_dir), f"update-{number}")
    return base + ".json", base + ".log"


def spawn(argv: list[str], state_dir: str, number: int,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start ``argv`` detached (own session, output to update ``number``'s log) and write
    its record; returns the record."""
    record_path, log = paths(state_dir, number)
    try:
        os.makedirs(os.path.dirname(record_path), exist_ok=True)
        with open(log, "ab") as out, open(os.devnull, "rb") as null:
            child = subprocess.Popen(argv, stdin=null, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, close_fds=True)
    except OSError as e:
        raise LiveUpdateError(err=e.errno or errno.EIO,
                              msg=f"cannot start {argv[0]} detached: {e.strerror}") from e
    child.returncode = 0  # never waited for here: it outlives this process by design
    record = {"update": number, "pid": child.pid, "log": log, "record": record_path,
              "argv": argv, "started": time.time(), **(extra or {})}
    try:
        jsonfile.dump(record_path, record, indent=2)
    except OSError as e:
        raise LiveUpdateError(err=e.errno or errno.EIO,
                              msg=f"cannot write {record_path}: {e.strerror}") from e
    return record



def record(state_dir: str, number: int) -> dict[str, Any]:
    """Update ``number``'s record, with the last line its log holds (``last_line``)."""
    record_path, log = paths(state_dir, number)
    try:
        with open(record_path) as f:
            rec: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"no record of update {number} in "
                              f"{state_dir} (was it started with --detach there?)") from None
    except (OSError, ValueError) as e:
        raise LiveUpdateError(err=errno.EIO, msg=f"{record_path}: {e}") from e
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    rec["last_line"] = lines[-1] if lines else ""
    return rec


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for process ``pid`` (not a child of ours) to end, on its pidfd: True when it
    did (or was gone already), False after ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError as e:
        raise LiveUpdateError(err=e.errno or errno.EIO, msg=f"pidfd_open {pid}: "
                              f"{e.strerror}") from e
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


def settle(state_dir: str, number: int, boot_id: str | None, timeout: float
           ) -> dict[str, Any]:
    """Before asking luod for update ``number``'s outcome: while luod still runs the kernel
    the update was started on (``boot_id``, luod's, is the record's ``boot_id_before``),
    wait for the detached ``luoctl update`` to end -- else a ``wait`` could reach luod
    before the update request did, and report that the update never happened. On a real
    host that wait ends with the kernel (the kexec kills the waiter too); after the reboot
    the boot id differs and nothing is waited for. Returns the record."""
    rec = record(state_dir, number)
    if boot_id is not None and boot_id == rec.get("boot_id_before") \
            and not wait_exit(int(rec["pid"]), timeout):
        raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"update {number} (pid {rec['pid']}) "
                              f"still runs after {timeout:g} s; its log: {rec['log']}")
    return rec
