"""``kexec``: load and execute the next kernel, for userspace on the emulated kernel.

    python -m liveupdate.userspace.kexec -l IMAGE [--command-line LINE | --append WORDS]
    python -m liveupdate.userspace.kexec -e
    python -m liveupdate.userspace.kexec -u

As kexec-tools with ``-s`` (``kexec_file_load``): by default the current command line is
reused; ``--append`` adds words to it, ``--command-line`` replaces it.

``--kho-finalize`` first writes 1 to ``/sys/kernel/debug/kho/out/finalize`` unless it already
reads 1, as the KHO selftest's ``init.c`` does before loading: 6.16-6.18 hand over nothing
without it (6.18 needs it before the load), 6.19 without LUO neither; 7.1 has no such file
and the step is skipped.
"""

from __future__ import annotations

import argparse
import errno
import sys

from liveupdate.abi.syscalls import LINUX_REBOOT_CMD_KEXEC
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError


def kho_finalize(k: Kernel) -> None:
    try:
        done = k.debugfs_read("out/finalize").strip() == b"1"
    except LiveUpdateError as e:
        if e.errno != errno.ENOENT:
            raise
        return  # 7.1+: stateless, nothing to finalize (or kho=off: nothing to hand over)
    if not done:
        k.debugfs_write("out/finalize", b"1\0")
        print("kexec: KHO finalized")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kexec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("-l", "--load", metavar="IMAGE", help="load IMAGE for a later -e")
    mode.add_argument("-e", "--exec", action="store_true", help="reboot into the loaded image")
    mode.add_argument("-u", "--unload", action="store_true", help="unload the loaded image")
    ap.add_argument("--command-line", help="the next kernel's command line")
    ap.add_argument("--append", default="", help="words to add to the reused command line")
    ap.add_argument("--kho-finalize", action="store_true",
                    help="finalize KHO (debugfs kho/out/finalize) before loading")
    args = ap.parse_args(argv)
    try:
        k = Kernel()
        if args.load:
            if args.kho_finalize:
                kho_finalize(k)
            with open(args.load, "rb") as f:
                raw = f.read()
            line = args.command_line if args.command_line is not None else k.cmdline()
            line = f"{line} {args.append}".strip()
            info = k.kexec_file_load(raw, line)
            print(f"kexec: loaded {args.load} at {info['entry']:#x}")
        elif args.unload:
            k.kexec_unload()
        else:
            k.reboot(LINUX_REBOOT_CMD_KEXEC)
    except (LiveUpdateError, OSError) as e:
        print(f"kexec: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
