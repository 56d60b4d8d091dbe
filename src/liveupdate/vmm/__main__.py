"""``python -m liveupdate.vmm NAME [--memory SIZE] [--accel auto|kvm|tcg] [--duty F]``: run one
VM as a luod client; see :mod:`liveupdate.vmm.vmm`. ``--incoming``: an empty migration slot
(:mod:`liveupdate.vmm.incoming`)."""

from __future__ import annotations

import argparse
import sys

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints, service
from liveupdate.vmm.incoming import Slot, migration_handlers
from liveupdate.vmm.vmm import Vmm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmm", description=__doc__)
    ap.add_argument("name")
    ap.add_argument("--memory", default="1G", help="guest memory, with K/M/G")
    ap.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    ap.add_argument("--plant", default="", choices=("", "cold-start", "no-device"),
                    help="a planted bug, for the demo's negative tests: cold-start throws "
                         "the saved vCPU state away at restore; no-device leaves an "
                         "assigned device out of the live update")
    ap.add_argument("--duty", type=float, default=1.0,
                    help="the share of time the vCPU runs; it idles (as on HLT) the rest: a "
                         "fleet's guests walk their memory, then idle")
    ap.add_argument("--incoming", action="store_true",
                    help="start empty, as a slot a VM is live-migrated into")
    ap.add_argument("--nic", default="", help="a VFIO device cdev to assign "
                    "(/dev/vfio/devices/vfioN): the NIC guest runs, see liveupdate.vmm.nic")
    ap.add_argument("--ring", type=int, default=4096, help="the NIC guest's ring entries")
    args = ap.parse_args(argv)
    units = {"K": 10, "M": 20, "G": 30}
    m = args.memory.upper()
    try:
        size = int(m[:-1]) << units[m[-1]] if m[-1] in units else int(m)
        if not 0 < args.duty <= 1:
            raise ValueError("--duty is a share of time, in (0, 1]")
        if args.incoming:
            slot = Slot(args.name, args.accel, args.duty)
            path = endpoints.service_socket(slot.backend.cmdline(), f"vmm-{args.name}")
            srv = service.listen(path)
            print(f"vmm {args.name}: " + ("slot holding a VM, resumed at step "
                  f"{slot.status()['steps']}" if slot.vmm else "empty slot, started")
                  + f", control {path}", flush=True)
            service.serve(srv, slot.handlers)
            return 0
        vmm = Vmm(args.name, size, args.accel, plant=args.plant, duty=args.duty,
                  nic=args.nic, ring=args.ring)
        path = endpoints.service_socket(vmm.backend.cmdline(), f"vmm-{args.name}")
        srv = service.listen(path)
        st = vmm.status()
        print(f"vmm {args.name}: {st['accel']}, {size >> 20} MiB, "
              + ("resumed at step " + str(st["steps"]) if st["restored"] else "started")
              + f", control {path}", flush=True)
        service.serve(srv, {**vmm.handlers, **migration_handlers(vmm)})
    except (LiveUpdateError, ValueError, OSError) as e:
        print(f"vmm {args.name}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
