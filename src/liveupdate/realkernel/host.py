"""What the real-kernel harness needs from the host: paths, Debian packages, progress.

The cache lives outside the checkout (``$LIVEUPDATE_REALKERNEL_CACHE``, else
``$XDG_CACHE_HOME/liveupdate/realkernel``, else ``~/.cache/liveupdate/realkernel``) so a
fresh clone on the same machine reuses a built kernel. Missing tools are installed when we
run as root (``apt-get install --no-install-recommends``, after one ``apt-get update``);
otherwise the error is one line naming the command that installs them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from liveupdate.errors import LiveUpdateError

# command -> the Debian package that provides it: to fetch and build, and to boot
TOOLS: dict[str, str] = {
    "gcc": "gcc", "make": "make", "flex": "flex", "bison": "bison", "bc": "bc",
    "perl": "perl", "xz": "xz-utils", "tar": "tar", "dpkg-deb": "dpkg",
    "apt-get": "apt", "fallocate": "util-linux",
}
QEMU: dict[str, str] = {"qemu-system-x86_64": "qemu-system-x86"}
# headers the kernel build needs (objtool links libelf; no command to probe for them)
HEADERS: dict[str, str] = {"/usr/include/libelf.h": "libelf-dev",
                           "/usr/include/openssl/opensslv.h": "libssl-dev"}


def cache_root() -> Path:
    env = os.environ.get("LIVEUPDATE_REALKERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "liveupdate" / "realkernel"


def missing(tools: dict[str, str] | None = None) -> list[str]:
    """Debian packages whose command or header is absent."""
    pkgs = [pkg for cmd, pkg in (tools or TOOLS).items() if shutil.which(cmd) is None]
    if tools is None:
        pkgs += [pkg for path, pkg in HEADERS.items() if not Path(path).exists()]
    return sorted(set(pkgs))


def ensure_tools(tools: dict[str, str] | None = None) -> None:
    """Install what is missing as root; otherwise say which command would."""
    pkgs = missing(tools)
    if not pkgs:
        return
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs]
    if os.geteuid() != 0:
        raise LiveUpdateError(err=errno.ENOENT, msg="the real-kernel harness needs "
                              f"{', '.join(pkgs)}: run `sudo {' '.join(cmd)}`")
    with step(f"installing {' '.join(pkgs)} (apt-get)"):
        for argv in (["apt-get", "update", "-qq"], cmd):
            p = subprocess.run(argv, capture_output=True, text=True, check=False,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if p.returncode:
                raise LiveUpdateError(err=errno.EIO, msg=f"{' '.join(argv)} failed: "
                                      + " | ".join(p.stderr.strip().splitlines()[-3:]))
    still = missing(tools)
    if still:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"apt-get left {', '.join(still)} "
                              "missing")


def say(msg: str) -> None:
    print(f"realkernel: {msg}", file=sys.stderr, flush=True)


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One harness at a time per cache: two builds would share an object tree and remove
    each other's staging folders."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another harness using {cache}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def step(what: str, times: dict[str, float] | None = None, name: str = "") -> Iterator[None]:
    """One line when a long step starts and one with its time when it ends; the time also
    goes to ``times[name]`` when given."""
    say(f"{what} ...")
    t0 = time.monotonic()
    yield
    seconds = time.monotonic() - t0
    if times is not None:
        times[name] = seconds
    say(f"{what}: done in {seconds:.1f} s")


def run(cmd: list[str], *, log: Path, cwd: Path | None = None, what: str,
        env: dict[str, str] | None = None) -> None:
    """Run a long command with its output in ``log``; on failure the error quotes the log's
    tail, so a broken build says why in one place."""
    try:
        with open(log, "ab") as out:
            rc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}).returncode
    except OSError as e:
        raise LiveUpdateError(err=e.errno or errno.EIO, msg=f"{what}: {e}") from e
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise LiveUpdateError(err=errno.EIO, msg=f"{what} failed (exit {rc}); last lines of "
                              f"{log}:\n  " + "\n  ".join(tail))
