"""The uAPI behaviours of the sessions front end that changed between releases, one object
per rule set, named by a LUO generation row's ``rules`` (:data:`liveupdate.abi.generations.
LUO`). A generation that changes a behaviour adds a subclass here and names it in its row.

* **6.19/7.0** -- ``luo_preserve_file`` does not look for the file in other sessions: the same
  memfd can be preserved twice; a failed RETRIEVE_FD is simply retried. Session names are
  taken with ``strscpy`` (an unterminated name is truncated to 63 bytes, an empty one is a
  name); the session ioctls check the session's direction in the command itself, after the
  size rules.
* **7.1+** -- ``luo_preserve_file`` refuses a file already preserved in any session (EBUSY:
  ``xa_insert`` on the global ``luo_preserved_files``); ``luo_retrieve_file`` keeps a failure
  (``luo_file->retrieve_status``) and answers it again on every later RETRIEVE_FD.
* **7.3** -- read in Linux 7.3.4 (:class:`Rules73`): name checks at CREATE_SESSION and a
  64-byte compare at RETRIEVE_SESSION, FINISH's ``reserved``, the direction check before the
  size rules, EFBIG for a memfd of more than UINT_MAX pages, seals restored through
  ``memfd_add_seals``; the incoming LUO data read (and a damaged one a panic) with
  ``liveupdate=off`` too, and a LUO subtree lookup failing other than ENOENT a panic.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import ClassVar

from liveupdate.abi import uapi
from liveupdate.abi.generations import LuoGeneration
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs import memfd
from liveupdate.kernel.fs.file import File


def _name(raw: bytes, *, strict: bool) -> str:
    try:
        return uapi.session_name(raw, strict=strict)
    except AbiError as e:
        raise LiveUpdateError(err=e.errno, msg=e.message) from e


class Rules619:
    # the errno of a memfd whose pages a u32 folio count cannot hold
    too_many_pages = errno.E2BIG
    # the errno of a RETRIEVE_FD whose memfd folio array kho_restore_vmalloc refuses
    folio_array_lost = errno.EIO
    # lib/tests/liveupdate.c's FLBs (the luo_flb test module): their names, and the data
    # each hands over (None: a page of state, as the 7.1 module modelled here keeps)
    test_flbs: ClassVar[tuple[str, ...]] = ("test-flb-v1",)
    test_flb_data: int | None = None
    # luo_early_startup runs whatever liveupdate= says (an early_initcall that checks only
    # kho_is_enabled), and a failed LUO subtree lookup other than ENOENT is a panic
    parses_incoming_when_off = False
    panic_on_subtree_error = False
    # luo-v5: only the session chain is read at boot (a panic when damaged); the entries and
    # file chains at the first open, an error then EIO on every open (7.3.4)
    deserialize_at_open = False
    # luo-v5's session and file blocks allocated at CREATE_SESSION and PRESERVE_FD
    # (kernel/luo/blocks.py) rather than at the reboot (7.3.4)
    blocks_at_ioctl = False
    # when the previous kernel's LUO pages go back: all at the first open; 7.3.4 frees
    # luo_ser at boot, the session chain at the first open, a file chain at its session's
    # FINISH and never the FLB header (kernel/luo/session_incoming.py)
    frees_incoming_as_73 = False

    def check_preserve(self, f: File, in_any_session: Callable[[File], bool]) -> None:
        """Before a file joins a session."""

    def retrieve_failed(self, errors: dict[int, LiveUpdateError], token: int,
                        e: LiveUpdateError) -> None:
        """A RETRIEVE_FD failed: 6.19 forgets it."""

    def create_name(self, raw: bytes) -> str:
        """CREATE_SESSION's name field: ``strscpy`` to 63 bytes, empty allowed."""
        return _name(raw, strict=False)

    def retrieve_name(self, raw: bytes) -> str | None:
        """RETRIEVE_SESSION's name field; None matches no session."""
        return _name(raw, strict=False)

    def check_direction(self, op: str, incoming: bool) -> None:
        """Before the size rules of a session ioctl: nothing here (the command checks)."""

    def check_finish(self, reserved: int) -> None:
        """SESSION_FINISH's ``reserved``: ignored."""

    def restore_seals(self, seals: int) -> int:
        """The seals of a retrieved memfd-v2: the preserved word as it is."""
        return seals


class Rules71(Rules619):
    def check_preserve(self, f: File, in_any_session: Callable[[File], bool]) -> None:
        if in_any_session(f):
            raise LiveUpdateError(err=errno.EBUSY, msg="PRESERVE_FD: the file is already "
                                  "preserved in a session")

    def retrieve_failed(self, errors: dict[int, LiveUpdateError], token: int,
                        e: LiveUpdateError) -> None:
        errors[token] = e  # sticky: retrieve_status


class Rules73(Rules71):
    """Linux 7.3.4's sessions uAPI (kernel/liveupdate/luo_session.c, mm/memfd_luo.c)."""

    too_many_pages = errno.EFBIG  # memfd_luo_preserve: DIV_ROUND_UP_ULL(size) > UINT_MAX
    folio_array_lost = errno.EINVAL  # memfd_luo_retrieve: kho_restore_vmalloc NULL -> -EINVAL
    # lib/tests/liveupdate.c: TEST_NFLBS 3, LIVEUPDATE_TEST_FLB_COMPATIBLE(i), data
    # TEST_FLB_MAGIC_BASE + i (test_flb_preserve) -- no page
    test_flbs = tuple(f"liveupdate-test-flb-v{i}" for i in range(3))
    test_flb_data = 0xFEEDF00DCAFEBEE0
    parses_incoming_when_off = True  # luo_core.c liveupdate_early_init
    panic_on_subtree_error = True  # luo_early_startup: err != -ENOENT -> luo_restore_fail
    deserialize_at_open = True  # luo_session_setup_incoming / luo_session_deserialize
    blocks_at_ioctl = True  # luo_session_insert / luo_preserve_file: kho_block_set_grow
    frees_incoming_as_73 = True  # luo_early_startup, luo_session_deserialize, luo_file_finish
    # luo_session_ioctl_ops' types: LUO_IOCTL_INCOMING / _OUTGOING (the rest: _ALL)
    DIRECTION: ClassVar[dict[str, bool]] = {"SESSION_FINISH": True, "SESSION_RETRIEVE_FD": True,
                                            "SESSION_PRESERVE_FD": False}

    def create_name(self, raw: bytes) -> str:
        """``luo_session_create``: ``strnlen(name, 64)`` of 0 or 64 (empty, or the whole
        field without a NUL) is EINVAL."""
        return _name(raw, strict=True)

    def retrieve_name(self, raw: bytes) -> str | None:
        """``luo_session_retrieve``: ``strncmp(it->name, name, 64)`` -- a name without a NUL
        in its 64 bytes matches no session (ENOENT), nothing is truncated."""
        if b"\0" not in raw[: uapi.SESSION_NAME_LENGTH]:
            return None
        return _name(raw, strict=False)

    def check_direction(self, op: str, incoming: bool) -> None:
        """``luo_session_ioctl``: ``luo_ioctl_type_valid`` right after the number check,
        before ``min_size`` and ``copy_struct_from_user`` (an outgoing FINISH with a long
        non-zero tail is EINVAL, not E2BIG)."""
        want = self.DIRECTION.get(op)
        if want is not None and want != incoming:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"{op} on an "
                                  f"{'incoming' if incoming else 'outgoing'} session")

    def check_finish(self, reserved: int) -> None:
        """``luo_session_finish``: ``reserved`` must be 0."""
        if reserved:
            raise LiveUpdateError(err=errno.EINVAL, msg="FINISH: reserved must be 0")

    def restore_seals(self, seals: int) -> int:
        """``memfd_luo_retrieve`` adds the seals with ``memfd_add_seals`` on a new memfd of
        mode 0777 (``memfd_alloc_file("", MFD_ALLOW_SEALING)``): F_SEAL_EXEC brings
        SHRINK|GROW|WRITE|FUTURE_WRITE along (mm/memfd.c)."""
        return memfd.implied_seals(seals, memfd.MODE_EXEC)


RULES: dict[str, Rules619] = {"6.19": Rules619(), "7.1": Rules71(), "7.3": Rules73()}
BASE = Rules619()  # a LUO without sessions (v3) or no LUO at all: the oldest rules


def rules_of(row: LuoGeneration) -> Rules619:
    """The rules object a generation row names."""
    return RULES.get(row.rules, BASE)
