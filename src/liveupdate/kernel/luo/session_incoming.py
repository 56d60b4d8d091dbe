"""The sessions front end's incoming half: the previous kernel's LUO data read at boot
(``luo_early_startup``) and the incoming sessions built at the first open of /dev/liveupdate
(``luo_session_deserialize``), with the previous kernel's LUO pages given back when the
generation's rules say.

Before 7.3 (as modelled): every LUO page -- the blob, the session and file arrays or chains,
the FLB header -- is read and given back at the first open. Linux 7.3.4
(:attr:`liveupdate.kernel.luo.rules.Rules619.frees_incoming_as_73`):

* ``luo_ser``: freed at boot, whatever happened (``luo_core.c luo_early_startup``:
  ``kho_restore_free(luo_ser)`` on its way out);
* the session chain: kept from boot (``luo_session_setup_incoming``), freed at the first open,
  also when deserializing fails (``luo_session_deserialize``: ``kho_block_set_destroy``);
* a session's file chain: read at the first open, freed at that session's FINISH, explicit or
  the implicit one of closing a retrieved session (``luo_file.c luo_file_finish``); a session
  never retrieved keeps it for the kernel's life, and a session whose files fail to
  deserialize gives it back then (``luo_file_deserialize``);
* the FLB header page: never (``luo_flb.c luo_flb_setup_incoming`` keeps a pointer, nothing
  frees it).

None of these is a leak across kexecs: a page the kernel keeps is not preserved again, so the
next kernel has it back (tests/kernel/test_luo_incoming_pages_73.py counts free pages over a
chain of updates). Deviations kept: ``luo_ser`` goes back once this kernel's own LUO blob
exists (:func:`free_ser`); when a file chain fails to decode, Linux frees the blocks it
walked, here they stay reserved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from liveupdate.abi import generations, luo_session
from liveupdate.errors import AbiError
from liveupdate.kernel.kho.incoming import restore_free
from liveupdate.kernel.luo.files import IncomingSet, InFile
from liveupdate.kernel.luo.flb import IncomingFlb
from liveupdate.kernel.luo.handover import reader_for

if TYPE_CHECKING:
    from liveupdate.kernel.luo.session import LuoSessions

Built = dict[str, tuple[IncomingSet, list[int]]]  # name -> its files, its file blocks


def read(luo: LuoSessions, phys: int, size: int | None) -> None:
    """Read with the reader of the blob's format among those this kernel reads; a native
    kernel tries only its own -- 6.19 meets 7.2's struct as a bad FDT, 7.2 meets 6.19's FDT
    as a wrong ``compatible`` -- and panics, as Linux."""
    k, as_73 = luo.k, luo.rules.frees_incoming_as_73
    flb_reads = luo.reads.get("flb", ())
    require_flb = bool(flb_reads) and set(flb_reads) <= generations.FLB_NODE
    try:
        head = k.mem.read(phys, 4, "LUO blob")
        inc = reader_for(luo.reads["luo"], head).read(
            k.mem, phys, size, require_flb, luo.rules.deserialize_at_open)
        meta = inc.meta
        if inc.flbs:
            luo.flbs_raw = luo_session.decode_flbs(k.mem, inc.flbs)
            if not as_73:
                meta.append(inc.flbs)
    except AbiError as e:
        k.panic(f"LUO: cannot restore the previous kernel's state: {e.message}")
    if as_73:  # luo_early_startup: the luo_ser page goes back at boot (free_ser)
        luo.incoming_ser = phys
        meta = [p for p in meta if p != phys]
    luo.incoming_raw = inc.sessions
    luo.incoming_later = inc.later
    luo.number = inc.number
    luo.incoming_meta = meta
    if inc.later is not None:  # 7.3.4 luo_early_startup's pr_info; sessions come later
        k.printk(f"luo: Retrieved live update data, liveupdate number: {luo.number}")
    else:
        k.printk(f"luo: live update {luo.number}: {len(luo.incoming_raw)} incoming sessions")


def free_ser(luo: LuoSessions) -> None:
    """7.3.4 ``luo_early_startup``: ``kho_restore_free(luo_ser)``, at boot. Called once this
    kernel's own LUO blob and FLB page exist -- Linux frees first, so its new blob may take
    the same page; here it cannot. The differential suite reads the incoming handover from
    RAM right after boot, before anything else of this boot takes the page."""
    if luo.incoming_ser:
        restore_free(luo.k.kho_in, luo.incoming_ser)
        luo.incoming_ser = 0


def deserialize(luo: LuoSessions) -> Built | None:
    """First open: the incoming sessions (``luo_session_deserialize``, once); None when
    there are none to build or building them failed (``restore_failed`` says why)."""
    raw, luo.incoming_raw = luo.incoming_raw, None
    if raw is None:
        return None
    later, luo.incoming_later = luo.incoming_later, None
    per_session: dict[str, list[int]] = {}
    try:
        if later is not None:
            raw = later(per_session)
        built = _build(luo, raw, per_session)
    except AbiError as e:  # luo_session_deserialize's saved_err: EIO every open
        luo.restore_failed = e.message
        luo.k.printk(f"luo: {e.message}; /dev/liveupdate is EIO")
        if luo.rules.frees_incoming_as_73:  # kho_block_set_destroy on the error path too
            _give_back(luo)
        return None
    _give_back(luo)
    return built


def _give_back(luo: LuoSessions) -> None:
    for p in luo.incoming_meta:  # the previous kernel's LUO pages: read, give back
        restore_free(luo.k.kho_in, p)
    luo.incoming_meta = []


def _build(luo: LuoSessions, raw: list[luo_session.SessionSer],
           per_session: dict[str, list[int]]) -> Built:
    by_compat = {h.compatible: h for h in luo.handlers}
    built: Built = {}
    for s in raw:
        inc = IncomingSet()
        blocks = per_session.get(s.name, [])
        if not luo.rules.frees_incoming_as_73:
            luo.incoming_meta.extend(blocks)
            blocks = []
        for f in s.files:
            if f.token in inc.files:
                continue  # 7.3.4 keeps duplicates; a retrieve finds the first
            handler = by_compat.get(f.compatible)
            if handler is None:
                luo.incoming_meta.extend(blocks)  # luo_file_deserialize: err_destroy_blocks
                raise AbiError(msg=f"session {s.name!r}: no handler for {f.compatible!r}")
            inc.files[f.token] = InFile(f.token, f.compatible, f.data, handler)
        built[s.name] = (inc, blocks)
    luo.flbs.incoming = {f.name: IncomingFlb(f.name, f.data, f.count) for f in luo.flbs_raw}
    return built


def finish_blocks(luo: LuoSessions, blocks: list[int]) -> None:
    """``luo_file_finish``: a finished session's file chain goes back (7.3.4)."""
    for p in blocks:
        restore_free(luo.k.kho_in, p)
    blocks.clear()
