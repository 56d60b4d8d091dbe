"""``python -m liveupdate.machine DIR``: run a machine in the foreground."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys

from liveupdate.errors import LiveUpdateError
from liveupdate.machine import control
from liveupdate.machine.machine import DEFAULT_CMDLINE, Machine
from liveupdate.procs import become_subreaper


def compile_code() -> None:
    """Kernel processes never write bytecode (the filesystem audit) and their userspace may
    not (Landlock): the machine, an unconfined host process, brings the package's cached
    bytecode up to date before any of them starts -- else each would compile its modules from
    source at every start (measured: ~0.15 s of every live update in the test suite)."""
    import compileall

    import liveupdate

    with contextlib.suppress(OSError):
        compileall.compile_dir(os.path.dirname(liveupdate.__file__), quiet=2)


def main() -> None:
    ap = argparse.ArgumentParser(prog="liveupdate-machine")
    ap.add_argument("dir")
    ap.add_argument("--memory", type=int, default=4 << 30)
    ap.add_argument("--image", default="")
    ap.add_argument("--cmdline", default=DEFAULT_CMDLINE)
    ap.add_argument("--devices", type=json.loads, default=[],
                    help='PCI devices as JSON: [{"kind": "nic", "bdf": "00:03.0", "rate": 1000}]')
    ap.add_argument("--no-boot", action="store_true")
    ap.add_argument("--ready-fd", type=int)
    args = ap.parse_args()
    become_subreaper()  # what a kernel leaves dying at a jump is reaped here
    compile_code()
    m = Machine(args.dir)
    def terminate(*_: object) -> None:
        m.power_off()
        m.close_templates()
        sys.exit(0)

    signal.signal(signal.SIGTERM, terminate)
    if not args.no_boot:
        try:
            m.power_on({"memory": args.memory, "image": args.image, "cmdline": args.cmdline,
                        "devices": args.devices})
        except LiveUpdateError as e:
            print(f"machine: {e}", file=sys.stderr)
            sys.exit(1)
    try:
        control.serve(m, args.ready_fd)
    finally:
        m.power_off()
        m.close_templates()
        m.orphans.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(m.socket_path)


if __name__ == "__main__":
    main()
