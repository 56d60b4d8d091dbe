"""``luod``: run the live update daemon (systemd unit: contrib/luod.service).

    luod [--socket PATH] [--allow-uid UID ...] [--group GID] [--prepare-timeout S]
         [--freeze-timeout S] [--finish-timeout S]

Opens /dev/liveupdate (a second luod fails with EBUSY and exit status 1), recovers what the
previous kernel's luod handed over, listens on its socket (mode 0600, or 0660 with
``--group``), and tells systemd it is ready when ``NOTIFY_SOCKET`` is set (sd_notify).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from liveupdate.client.backends import open_backend
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints
from liveupdate.luod.daemon import Luod
from liveupdate.luod.orchestrator import Quota, Timeouts


def sd_notify(state: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)


def _size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    t = text.strip().upper()
    try:
        return int(t[:-1]) << units[t[-1]] if t and t[-1] in units else int(t, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="luod", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=None, help="listen here [default: $LUOD_SOCKET, the "
                    "emulated machine's run folder, or /run/luod/luod.sock]")
    ap.add_argument("--allow-uid", type=int, action="append", default=[],
                    help="a uid that may be a client (root always may)")
    ap.add_argument("--group", type=int, default=None, help="socket group (mode 0660)")
    ap.add_argument("--socket-mode", type=lambda s: int(s, 8), default=None,
                    help="socket permission bits, octal [default: 0600, 0660 with --group]")
    ap.add_argument("--prepare-timeout", type=float, default=10.0)
    ap.add_argument("--freeze-timeout", type=float, default=10.0)
    ap.add_argument("--finish-timeout", type=float, default=60.0)
    ap.add_argument("--quota-files", type=int, default=0, metavar="N",
                    help="files each client may preserve per update (0: no limit; the kernel "
                         "caps a 6.19 session at 128)")
    ap.add_argument("--quota-bytes", type=_size, default=0, metavar="SIZE",
                    help="bytes each client may preserve per update, with K/M/G (0: no "
                         "limit). Either quota makes luod preserve for its clients on 6.19+.")
    args = ap.parse_args(argv)
    mode = args.socket_mode if args.socket_mode is not None else (
        0o660 if args.group is not None else 0o600)
    try:
        backend = open_backend()
        path = args.socket or endpoints.socket_path(backend.cmdline())
        d = Luod(backend, path, allow_uids=frozenset(args.allow_uid),
                 timeouts=Timeouts(args.prepare_timeout, args.freeze_timeout,
                                   args.finish_timeout), mode=mode,
                 quota=Quota(args.quota_files, args.quota_bytes))
        d.recover()
        d.listen()
        if args.group is not None:
            os.chown(path, -1, args.group)
    except LiveUpdateError as e:
        print(f"luod: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"luod: LUO {d.gen}, {d.phase.value}, listening on {path}", flush=True)
    sd_notify("READY=1")
    d.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
