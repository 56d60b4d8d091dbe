"""``kexec``: load and execute the next kernel, for userspace on the emulated kernel.

    python -m liveupdate.userspace.kexec -l IMAGE [--command-line LINE | --append WORDS]
    python -m liveupdate.userspace.kexec -e
    python -m liveupdate.userspace.kexec -u

As kexec-tools with ``-s`` (``kexec_file_load``): by default the current command line is
reused; ``--append`` adds words to it, ``--command-line`` replaces it.
"""

from __future__ import annotations

import argparse
import sys

from liveupdate.abi.syscalls import LINUX_REBOOT_CMD_KEXEC
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kexec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("-l", "--load", metavar="IMAGE", help="load IMAGE for a later -e")
    mode.add_argument("-e", "--exec", action="store_true", help="reboot into the loaded image")
    mode.add_argument("-u", "--unload", action="store_true", help="unload the loaded image")
    ap.add_argument("--command-line", help="the next kernel's command line")
    ap.add_argument("--append", default="", help="words to add to the reused command line")
    args = ap.parse_args(argv)
    try:
        k = Kernel()
        if args.load:
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
