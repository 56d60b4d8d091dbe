"""The faults ``luoctl demo --fault`` can arm: one table, what each hits, at which phase, and
the outcome it is defined to end in.

Every fault is injected for real, at one phase point of a live update driven by luod: a
``SIGKILL`` of a client (the cache), a VMM or luod; a client that never acknowledges; an image
that does not load or cannot take the handover; a handler whose freeze fails inside
``reboot()``; the power lost before the jump, during the next kernel's boot or during
restore. :mod:`liveupdate.scenario.faultrun` injects them and observes the outcome; the
reliability matrix (docs/reliability.md) is this table, run.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLLED_BACK, UPDATED, COLD_BOOT = "rolled back", "updated", "cold boot"


@dataclass(frozen=True)
class Fault:
    name: str
    target: str  # what is hit: client, vmm, luod, image, kernel, power
    phase: str  # normal, prepared, frozen, reboot, updated
    what: str
    expect: str
    generation: str = ""  # only this LUO generation has the mechanism ("" = any)
    cmdline: str = ""  # added to the kernel command line
    helper: str = ""  # a luod_client that misbehaves: its --fault, or "hold" (never restores)


def _kills(target: str, who: str) -> list[Fault]:
    return [
        Fault(f"kill-{target}@normal", target, "normal",
              f"SIGKILL {who} before the update starts", UPDATED),
        Fault(f"kill-{target}@prepare", target, "prepared",
              f"{who} is SIGKILLed inside prepare, before acknowledging", ROLLED_BACK),
        Fault(f"kill-{target}@freeze", target, "frozen",
              f"{who} is SIGKILLed inside freeze, before acknowledging", ROLLED_BACK),
        Fault(f"kill-{target}@restore", target, "updated",
              f"{who} is SIGKILLed in the next kernel before it retrieves anything",
              UPDATED),
    ]


FAULTS: tuple[Fault, ...] = (
    *_kills("client", "the cache (a luod client)"),
    *_kills("vmm", "VMM vm0"),
    Fault("kill-luod@normal", "luod", "normal", "SIGKILL luod before the update; init "
          "restarts it and the clients reconnect", UPDATED),
    Fault("kill-luod@prepared", "luod", "prepared", "SIGKILL luod while a client holds the "
          "prepare barrier", ROLLED_BACK, helper="no-prepare-ack"),
    Fault("kill-luod@frozen", "luod", "frozen", "SIGKILL luod while every VM is paused and a "
          "client holds the freeze barrier", ROLLED_BACK, helper="no-freeze-ack"),
    Fault("kill-luod@updated", "luod", "updated", "SIGKILL luod in the next kernel after the "
          "VMs resumed, before FINISH", UPDATED, helper="hold"),
    Fault("no-ack@prepare", "helper", "prepared", "a client never acknowledges prepare",
          ROLLED_BACK, helper="no-prepare-ack"),
    Fault("no-ack@freeze", "helper", "frozen", "a client never acknowledges freeze",
          ROLLED_BACK, helper="no-freeze-ack"),
    Fault("enomem@prepare", "helper", "prepared", "a client preserves a memfd twice the "
          "size of RAM: PRESERVE_FD fails with ENOMEM", ROLLED_BACK, helper="sparse-huge"),
    Fault("fds-kernel@prepare", "kernel", "prepared", "the kernel's file table is full when "
          "the update starts (RLIMIT_NOFILE of the kernel process)", ROLLED_BACK),
    Fault("fds-luod@normal", "luod", "normal", "luod has no free fd when asked for the "
          "update (its RLIMIT_NOFILE): it cannot open the next image", ROLLED_BACK),
    Fault("bad-image@normal", "image", "normal", "the next image is not a kernel",
          ROLLED_BACK),
    Fault("incompatible-image@normal", "image", "normal", "the next kernel cannot read this "
          "handover (a v3 image under 6.19)", ROLLED_BACK, generation="6.19"),
    Fault("freeze-fails@reboot", "kernel", "reboot", "a LUO subsystem's freeze fails inside "
          "reboot()", ROLLED_BACK, generation="v3", cmdline="luo_fail=freeze"),
    Fault("power-loss@reboot", "power", "reboot", "the power goes during reboot(), before the "
          "jump", COLD_BOOT, cmdline="power_loss=jump"),
    Fault("power-loss@boot", "power", "updated", "the power goes during the next kernel's "
          "boot", COLD_BOOT, cmdline="power_loss=boot"),
    Fault("power-loss@restore", "power", "updated", "the power goes at the first retrieve in "
          "the next kernel", COLD_BOOT, cmdline="power_loss=restore"),
)
BY_NAME = {f.name: f for f in FAULTS}
HELPER = "stuck"


def helper_line(py: str, fault: Fault, memory: int) -> str:
    """The init service for a fault's helper client, or ''."""
    if not fault.helper:
        return ""
    if fault.helper == "sparse-huge":
        return (f"{py} -m liveupdate.userspace.luod_client hold {HELPER} 0x1:{2 * memory} "
                "--sparse\n")
    kind = "none" if fault.helper == "hold" else fault.helper
    return (f"{py} -m liveupdate.userspace.luod_client hold {HELPER} 0x1:65536 "
            f"--fault {kind}\n")
