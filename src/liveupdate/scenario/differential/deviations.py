"""Where the emulated kernel deliberately answers differently from the real Linux 7.3.

Each :class:`Deviation` names the steps of the differential suite it explains (scenario,
stage, step index within the stage) and why; the code that deviates says so in its
docstring too. The fast suite fails on a difference not listed here and on a listed one
that no longer happens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    name: str
    reason: str


Key = tuple[str, int, int]
KNOWN: dict[Key, Deviation] = {}


def _at(dev: Deviation, *keys: Key) -> None:
    for key in keys:
        KNOWN[key] = dev





# what the suite found on its first run against Linux 7.3.4, fixed in the emulator since (the
# doc lists them; each fix names the Linux function it follows)
FOUND_AND_FIXED = (
    ("seals after PRESERVE_FD", "memfd_luo_freeze rewrites only pos: a seal added after "
     "PRESERVE_FD is not handed over (liveupdate.kernel.fs.memfd_luo)"),
    ("F_SEAL_WRITE on a preserved memfd", "EBUSY: memfd_wait_for_pins finds the folios LUO "
     "pinned (liveupdate.kernel.fs.memfd)"),
    ("MFD_NOEXEC_SEAL and MFD_EXEC", "memfd_create takes them (mode 0666 with F_SEAL_EXEC, "
     "which RETRIEVE_FD turns into 0x3e on its mode-0777 memfd)"),
    ("a pipe, a socket, /dev/null", "fget succeeds, no handler can preserve them: ENOENT, "
     "not EBADF (liveupdate.kernel.fs.file.FileTable.lookup)"),
    ("non-UTF-8 session names", "names are bytes to Linux: kept through the handover and "
     "GET_NAME instead of EINVAL (liveupdate.abi.uapi.session_name)"),
    ("a /proc/self/fd reopen of a memfd", "a new file of the same inode, refused by a second "
     "PRESERVE_FD with EBUSY (liveupdate.kernel.syscalls.files)"),
    ("an unlinked tmpfs file", "open(O_TMPFILE) on a tmpfs makes an unnamed shmem inode, "
     "which memfd_luo_can_preserve takes: preserved and retrieved as a memfd "
     "(liveupdate.kernel.syscalls.files)"),
    ("test_kho", "7.3's lib/test_kho.c runs at device_initcall (its subtree before LUO's), "
     "keeps folios_info as a kho_vmalloc and gives its blob-size; the port did none of it "
     "(liveupdate.kernel.testmods.test_kho, the 7.3 KHO core)"),
    ("the selftest FLBs", "7.3's lib/tests/liveupdate.c hands over three FLBs, "
     "liveupdate-test-flb-v0..2, whose data is the value 0xFEEDF00DCAFEBEE0 + i "
     "(liveupdate.kernel.testmods.luo_flb, Rules73)"),
)


# the handover at the jump: a value's path in the stable reduction
# (liveupdate.scenario.differential.handover) -> why it differs
HANDOVER_KNOWN: dict[str, Deviation] = {}
