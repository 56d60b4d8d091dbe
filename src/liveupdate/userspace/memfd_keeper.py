"""``memfd_keeper``: keep a memfd across a live update of a LUO v3 kernel (a userspace program
of the emulated machine; the demo and people use it).

    python -m liveupdate.userspace.memfd_keeper preserve --token 0x1a --size 64M --text "..."
    python -m liveupdate.userspace.memfd_keeper restore --token 0x1a

``preserve`` creates a memfd, writes the text at offset 0 and a checksummed pattern after it,
registers it with ``FD_PRESERVE``, sends ``SET_EVENT(PREPARE)``, prints what it did, and stays
in the background holding ``/dev/liveupdate`` until the reboot (as the kernel self-tests'
``daemonize_and_wait``). ``restore`` (in the next kernel) gets the file back with
``FD_RESTORE``, checks the pattern, prints the text and the physical extents, and sends
``SET_EVENT(FINISH)``. Errors are one line and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys

from liveupdate.abi import uapi, uapi_generation
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError

UAPI = uapi_generation.V3  # the seed's global state machine: FD_PRESERVE, SET_EVENT
HEADER = 4096  # the text lives in the first page; the pattern fills the rest


def _io(k: Kernel, dev: int, name: str, **fields: int) -> dict[str, int]:
    entry = UAPI.ioctl(name)
    buf = bytearray(entry.pack(**fields))
    k.ioctl(dev, entry.number, buf)
    return entry.unpack(bytes(buf))


def _digest(k: Kernel, fd: int, size: int) -> str:
    h = hashlib.blake2b(digest_size=8)
    for off in range(HEADER, size, 1 << 20):
        h.update(k.pread(fd, min(1 << 20, size - off), off))
    return h.hexdigest()


def preserve(k: Kernel, token: int, size: int, text: str) -> None:
    dev = k.open("/dev/liveupdate")
    fd = k.memfd_create("keeper")
    k.ftruncate(fd, size)
    mapping = k.mmap(fd, size)
    view = mapping.view
    view[:HEADER] = text.encode()[:HEADER].ljust(HEADER, b"\0")
    seed = hashlib.blake2b(text.encode(), digest_size=64).digest()
    for off in range(HEADER, size, len(seed)):
        view[off : off + len(seed)] = seed[: size - off]
    _io(k, dev, "FD_PRESERVE", fd=fd, token=token)
    _io(k, dev, "SET_EVENT", event=uapi.Event.PREPARE)
    print(f"memfd_keeper: preserved {size >> 20} MiB as token {token:#x} "
          f"(pattern {_digest(k, fd, size)}), LUO prepared; holding /dev/liveupdate",
          flush=True)
    if os.fork():
        os._exit(0)
    os.setsid()
    for stdio in (0, 1, 2):
        os.close(stdio)
    signal.pause()  # the reboot ends this process; the kernel keeps what it froze


def restore(k: Kernel, token: int) -> None:
    dev = k.open("/dev/liveupdate")
    state = uapi.State(_io(k, dev, "GET_STATE")["state"])
    fd = _io(k, dev, "FD_RESTORE", token=token)["fd"]
    st = k.fstat(fd)
    text = k.pread(fd, HEADER, 0).rstrip(b"\0").decode(errors="replace")
    extents = k.extents(fd, -(-st["size"] // 4096) * 4096)
    print(f"memfd_keeper: LUO {state.name.lower()}; token {token:#x} restored: "
          f"{st['size'] >> 20} MiB, pattern {_digest(k, fd, st['size'])}, "
          f"{len(extents)} extents from {extents[0][0]:#x}")
    print(f"memfd_keeper: text: {text}")
    _io(k, dev, "SET_EVENT", event=uapi.Event.FINISH)
    print("memfd_keeper: FINISH: LUO normal")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="memfd_keeper", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("preserve", "restore"))
    ap.add_argument("--token", type=lambda s: int(s, 0), default=0x1A)
    ap.add_argument("--size", default="64M", help="bytes, with K/M/G (preserve)")
    ap.add_argument("--text", default="hello from the previous kernel")
    args = ap.parse_args(argv)
    try:
        k = Kernel()
        if args.action == "preserve":
            units = {"K": 10, "M": 20, "G": 30}
            s = args.size.upper()
            size = int(s[:-1]) << units[s[-1]] if s[-1] in units else int(s)
            preserve(k, args.token, size, args.text)
        else:
            restore(k, args.token)
    except (LiveUpdateError, ValueError) as e:
        print(f"memfd_keeper: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
