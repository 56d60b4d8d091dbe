"""The generation matrix: a live update from every kernel generation to every other, as Linux
behaves between them and with our negotiation -- and docs/generations.md from it.

Each cell boots the writer generation in process (:mod:`liveupdate.scenario.inprocess`: the real
boot path on real RAM) with ``test_kho=1`` (KHO-level data of known checksum) and, where the
writer has LUO, one memfd of known contents preserved through its own uAPI (v3
``FD_PRESERVE`` + PREPARE; 6.19+ a session); then kexec's the reader generation and observes
what happened: the next kernel panicked, booted cold, answers EIO on /dev/liveupdate, has no
LUO to retrieve through, or gives back the memfd byte for byte. ``native`` runs both kernels
with ``liveupdate_compat=off`` (exactly Linux: no check before the jump); ``negotiated`` with
``liveupdate_negotiate=on`` on both, where a cell that cannot work must be refused before the
jump (the load, or ``reboot()``), nothing lost.

``expected`` comes from the format table (:func:`liveupdate.abi.formats.incompatibilities`
for native, :func:`liveupdate.abi.generations.agree` for negotiated), the observation from
the kernels; the test (tests/kernel/test_generations.py) holds them equal.

    python -m liveupdate.scenario.generations [--out docs/generations.md]   # runs all cells
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from liveupdate.abi import formats, generations, uapi
from liveupdate.abi.image import KernelImage
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.fs.file import File, IoctlOps
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.kho.core import CORES
from liveupdate.kernel.power import Halted
from liveupdate.scenario.inprocess import Rig

GENERATIONS = tuple(generations.RELEASES)
MODES = ("native", "negotiated")
TOKEN = 0x4C55
SESSION = "matrix"
PAYLOAD = (b"live update generation matrix " * 2200)[:65536]


def cmdline(mode: str) -> str:
    extra = "liveupdate_compat=off" if mode == "native" else "liveupdate_negotiate=on"
    return f"kho=on liveupdate=on test_kho=1 {extra}"


def expected(writer: str, reader: str, mode: str) -> str:
    w, r = KernelImage.of(writer), KernelImage.of(reader)
    # the scenario preserves one memfd: no other file component is written
    written = {c: f for c, f in w.native().items()
               if c == "memfd" or c not in generations.FILE_COMPONENTS}
    if mode == "native":
        bad = formats.incompatibilities(written, r.reads_for(False))
        return bad[0].effect if bad else "restored"
    try:
        agreed = generations.agree(written, w.capable(), r.manifest())
    except AbiError:
        return "refused"
    if CORES[w.kho_core].finalized_by_userspace and agreed["kho"] != written["kho"]:
        return "refused"  # notifier cores finalize before the load: their own format only
    if "luo" in written and ("luo" not in agreed or "memfd" not in agreed):
        return "refused"  # the memfd could not cross
    return "restored"


def ioctl(k: Kernel, target: File, op: str, fds: list[File] | None = None,
          **fields: Any) -> tuple[dict[str, Any], list[File]]:
    """One ioctl on ``target`` (the device or a session file) through the kernel's own
    dispatch, as a syscall would make it."""
    assert k.luo is not None
    entry = uapi.ioctl(k.luo.gen, op)
    arg = entry.pack(size=entry.size, **fields)
    given = list(fds or [])
    assert isinstance(target.ops, IoctlOps)
    out, new = target.ops.ioctl(target, entry.number, arg, [3] * len(given),
                                lambda fd: given[0].get())
    return entry.unpack(out.ljust(entry.size, b"\0")), new


def _preserve_v3(k: Kernel, dev: File, f: File) -> None:
    ioctl(k, dev, "FD_PRESERVE", [f], fd=3, token=TOKEN)
    ioctl(k, dev, "SET_EVENT", event=0)  # PREPARE


def _preserve_sessions(k: Kernel, dev: File, f: File) -> None:
    _, (session,) = ioctl(k, dev, "CREATE_SESSION", fd=0, name=SESSION.encode())
    ioctl(k, session, "SESSION_PRESERVE_FD", [f], fd=3, token=TOKEN)


def _retrieve_v3(k: Kernel, dev: File) -> File:
    return ioctl(k, dev, "FD_RESTORE", fd=0, token=TOKEN)[1][0]


def _retrieve_sessions(k: Kernel, dev: File) -> File:
    _, (session,) = ioctl(k, dev, "RETRIEVE_SESSION", fd=0, name=SESSION.encode())
    return ioctl(k, session, "SESSION_RETRIEVE_FD", fd=0, token=TOKEN)[1][0]


# per LUO front end (abi.generations.LuoGeneration.frontend): the writer's way of preserving
# one memfd, and the reader's way of getting it back
PRESERVE = {"v3": _preserve_v3, "sessions": _preserve_sessions}
RETRIEVE = {"v3": _retrieve_v3, "sessions": _retrieve_sessions}


def preserve(k: Kernel) -> None:
    """One memfd of known contents, preserved the writer's way."""
    assert k.luo is not None
    m = k.new_memfd("matrix")
    m.truncate(len(PAYLOAD))
    m.pwrite(PAYLOAD, 0)
    PRESERVE[k.luo.row.frontend](k, k.luo.open(), kmemfd.open_file(m))


def retrieve(k: Kernel) -> bytes:
    assert k.luo is not None
    m = RETRIEVE[k.luo.row.frontend](k, k.luo.open()).private
    return bytes(m.pread(m.size, 0))


def run_cell(writer: str, reader: str, mode: str) -> dict[str, Any]:
    """One live update, observed. Never raises for what the kernels do."""
    rig, out = Rig(), io.StringIO()
    rec: dict[str, Any] = {"writer": writer, "reader": reader, "mode": mode,
                           "expected": expected(writer, reader, mode)}
    try:
        with contextlib.redirect_stdout(out):
            k = rig.boot(cmdline(mode), KernelImage.of(writer))
            has_luo = k.luo is not None
            if has_luo:
                preserve(k)
            try:
                k2 = rig.kexec(k, cmdline(mode), KernelImage.of(reader))
            except LiveUpdateError as e:
                rec.update(observed="refused", detail=e.message)
                return rec
            except Halted as e:
                rec.update(observed="panic", detail=str(e))
                return rec
            rec.update(_observe(k2, has_luo, out.getvalue()))
    except Halted as e:  # the reader panicked while booting
        rec.update(observed="panic", detail=str(e))
    finally:
        rig.close()
        rec["console"] = [line for line in out.getvalue().splitlines()
                          if "KHO" in line or "luo" in line or "panic" in line][-12:]
    return rec


def _observe(k: Kernel, had_luo: bool, console: str) -> dict[str, Any]:
    kho_ok = "KHO restore succeeded" in console
    if k.kho_in is None:
        return {"observed": "cold boot", "detail": _last(console, "KHO: setup:")
                or _last(console, "disabling KHO revival")}
    if not kho_ok:
        return {"observed": "KHO data LOST", "detail": _last(console, "kho_test")}
    if not had_luo:
        return {"observed": "restored", "detail": "test_kho intact"}
    if k.luo is None:
        return {"observed": "unreachable", "detail": "the next kernel has no LUO"}
    try:
        got = retrieve(k)
    except LiveUpdateError as e:
        if e.errno == errno.EIO:
            return {"observed": "EIO", "detail": e.message}
        return {"observed": "memfd LOST", "detail": f"{errno.errorcode.get(e.errno)}: "
                                                    f"{e.message}"}
    if got != PAYLOAD:
        return {"observed": "memfd LOST", "detail": "contents differ"}
    return {"observed": "restored", "detail": "test_kho and the memfd intact"}


def _last(console: str, needle: str) -> str:
    hits = [line for line in console.splitlines() if needle in line]
    return hits[-1] if hits else ""


HEADER = """# Live update between kernel generations

Generated by the test run (`tests/kernel/test_generations.py`, one record per cell;
`python -m liveupdate.scenario.generations --out docs/generations.md` runs the cells itself).
Rows: the kernel that hands over (writer); columns: the kernel that boots (reader). Each cell
is a real live update of in-process kernels on real RAM: `test_kho=1` data of known checksum
and, where the writer has LUO, one 64 KiB memfd of known contents preserved through the
writer's uAPI, then kexec into the reader and an attempt to get everything back.

Generations (`luoctl image create --generation G`): 6.16 (kho-v1, 512-byte bitmaps, no LUO),
6.18 (kho-v1, no LUO), v3 (the seed's state machine), 6.19 (luo-v1, memfd-v1), 7.0 (+
luo-flb-v1), 7.1 (kho-v3 radix tree, memfd-v2), 7.2 (kho-v4, luo-v5 over kho_block), 7.3 (the
formats of 7.2; its own behaviours come from the real 7.3, issue #24).

Outcomes: **restored** -- everything back, byte for byte; **cold boot** -- the reader ignored
the handover (KHO root `compatible` mismatch, kho.md 8); **panic** -- the reader could not read
the LUO, session or FLB data (`luo_restore_fail`, luo.md 7); **EIO** -- every open of
/dev/liveupdate fails (no handler for the file's format); **unreachable** -- the reader has no
LUO: the memfd's memory stays reserved and nobody can retrieve it; **refused** -- (negotiated
only) the load or `reboot()` said no before anything was frozen, naming why. A cell whose
observation differs from the table's prediction is marked **(UNEXPECTED)**.

No two releases differ only in a file handler (memfd-v2 arrived with kho-v3, both in 7.1), so
**EIO** shows in no cell here; `tests/kernel/test_generations.py` produces it with an image
whose manifest lies about reading memfd-v2.

One deviation from Linux, on purpose: a kho-v1 map with the other bitmap size (6.16 vs
6.18+) carries the same `compatible`, and Linux would misread it silently; our readers detect
the size and boot cold instead.
"""


def render(records: list[dict[str, Any]]) -> str:
    lines = [HEADER]
    for mode, title in (("native", "As Linux behaves (negotiation off, `liveupdate_compat=off`)"),
                        ("negotiated", "With negotiation (`liveupdate_negotiate=on` on both "
                                       "kernels)")):
        cells = {(r["writer"], r["reader"]): r for r in records if r["mode"] == mode}
        ok = sum(1 for r in cells.values() if r["observed"] == "restored")
        lines += [f"## {title}", "", f"{ok} of {len(cells)} cells restore everything.", "",
                  "| writer \\ reader | " + " | ".join(GENERATIONS) + " |",
                  "|---|" + "---|" * len(GENERATIONS)]
        for w in GENERATIONS:
            row = []
            for r in GENERATIONS:
                c = cells.get((w, r))
                if c is None:
                    row.append("-")
                    continue
                mark = "" if c["observed"] == c["expected"] else " **(UNEXPECTED)**"
                row.append(c["observed"] + mark)
            lines.append(f"| **{w}** | " + " | ".join(row) + " |")
        lines.append("")
        why: dict[tuple[str, str], list[str]] = {}
        for (w, r), c in sorted(cells.items(), key=lambda x: (GENERATIONS.index(x[0][0]),
                                                              GENERATIONS.index(x[0][1]))):
            if c["observed"] != "restored":
                why.setdefault((c["observed"], _reason(c["detail"])), []).append(f"{w}→{r}")
        if why:
            lines += ["Why (the kernels' own messages, release strings shortened; cells "
                      "writer→reader):", ""]
            for (outcome, detail), where in sorted(why.items()):
                lines.append(f"* **{outcome}** `{detail}`: {', '.join(where)}")
            lines.append("")
    return "\n".join(lines)


def _reason(detail: str) -> str:
    """A message without what differs from cell to cell (addresses, releases, the boot
    log's prefix), so that cells with one cause share one line."""
    text = re.sub(r"0x[0-9a-f]{5,}", "ADDR", detail.split("KHO: setup: ")[-1])
    text = re.sub(r"\b\d+\.\d+(\.\d+)?-lu(-v3)?\b", "REL", text)
    return text.replace("|", "/")


def load(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="generations", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here")
    ap.add_argument("--records", type=Path, default=None,
                    help="render these records instead of running the cells")
    args = ap.parse_args(argv)
    if args.records is not None:
        records = load(args.records)
    else:
        records = [run_cell(w, r, m) for m in MODES for w in GENERATIONS for r in GENERATIONS]
    text = render(records)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    bad = [r for r in records if r["observed"] != r["expected"]]
    for r in bad:
        print(f"UNEXPECTED {r['mode']} {r['writer']} -> {r['reader']}: expected "
              f"{r['expected']}, observed {r['observed']} ({r['detail']})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
