"""Every kernel generation to every other, as Linux behaves and with negotiation: the N x N
matrix of :mod:`liveupdate.scenario.generations` (real boot path, real RAM, a memfd of known
contents), each cell held to the format table's prediction; the session renders
docs/generations.md from the records (tests/conftest.py). Then what the matrix cannot show:
seals, a lying manifest, files preserved after the load, and inspection of every
generation's handover."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path

import pytest

from liveupdate.abi.image import KernelImage
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import kexec, reboot
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.luo.session import LuoSessions
from liveupdate.kernel.power import Halted
from liveupdate.scenario import generations as matrix
from liveupdate.scenario.inprocess import Rig

CELLS = [(m, w, r) for m in matrix.MODES for w in matrix.GENERATIONS
         for r in matrix.GENERATIONS]


@pytest.mark.parametrize("mode, writer, reader", CELLS,
                         ids=[f"{m}-{w}-to-{r}" for m, w, r in CELLS])
def test_cell(mode: str, writer: str, reader: str) -> None:
    rec = matrix.run_cell(writer, reader, mode)
    records = os.environ.get("LIVEUPDATE_RELIABILITY_RECORDS")
    if records:
        folder = Path(records) / "generations"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{mode}-{writer}-{reader}.json").write_text(json.dumps(rec, indent=1))
    assert rec["observed"] == rec["expected"], rec
    if mode == "negotiated":  # the extension never lets a cell fail after the jump
        assert rec["observed"] in ("restored", "refused"), rec


NEG = "kho=on liveupdate=on liveupdate_negotiate=on test_kho=1"


def _boot_with_memfd(rig: Rig, gen: str, seals: int = 0) -> tuple[object, kmemfd.Memfd]:
    k = rig.boot(NEG, KernelImage.of(gen))
    matrix.preserve(k)
    m = k.luo.outgoing[matrix.SESSION].files.get(matrix.TOKEN).file.private  # type: ignore
    if seals:
        m.seals = seals
    return k, m


def test_sealed_memfd_cannot_roll_back_to_memfd_v1() -> None:
    """Refused at the load, naming the file and the format; once unsealed... it goes."""
    rig = Rig()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k, m = _boot_with_memfd(rig, "7.2", seals=kmemfd.F_SEAL_SEAL | kmemfd.F_SEAL_GROW)
            with pytest.raises(LiveUpdateError) as e:
                kexec.file_load(k, KernelImage.of("6.19").encode(), NEG)
            assert e.value.errno == errno.EINVAL
            assert f"session 'matrix' token {matrix.TOKEN:#x} is sealed" in e.value.message
            assert "memfd-v1" in e.value.message
            assert k.kexec_image is None  # nothing loaded, nothing changed
            m.seals = kmemfd.F_SEAL_SEAL  # memfd-v1 retrieves every memfd like this
            k2 = rig.kexec(k, NEG, KernelImage.of("6.19"))
            assert matrix.retrieve(k2) == matrix.PAYLOAD
    finally:
        rig.close()


def test_file_preserved_after_the_load_is_checked_at_reboot() -> None:
    rig = Rig()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k = rig.boot(NEG, KernelImage.of("7.2"))
            kexec.file_load(k, KernelImage.of("6.19").encode(), NEG)
            matrix.preserve(k)
            m = k.luo.outgoing[matrix.SESSION].files.get(matrix.TOKEN).file.private  # type: ignore
            m.seals = kmemfd.F_SEAL_WRITE | kmemfd.F_SEAL_SEAL
            with pytest.raises(LiveUpdateError) as e:
                reboot.prepare_jump(k)
            assert e.value.errno == errno.EINVAL and "reboot(KEXEC)" in e.value.message
            assert not k.luo.frozen and not k.require_kho().finalized  # nothing frozen
            assert k.luo.outgoing[matrix.SESSION].files.get(matrix.TOKEN).file.private is m
    finally:
        rig.close()


@pytest.mark.parametrize("liar, lie, outcome", [
    ("6.19", {"kho": ["kho-v1", "kho-v4"]}, "cold boot"),  # claims the radix tree
    ("7.1", {"luo": ["luo-v1", "luo-v5"]}, "panic"),  # claims 7.2's luo_ser
    ("6.19", {"memfd": ["memfd-v1", "memfd-v2"]}, "EIO"),  # claims the sealed struct
])
def test_a_lying_manifest_is_caught_by_the_next_kernel(liar: str, lie: dict[str, list[str]],
                                                       outcome: str) -> None:
    """The writer believes the manifest; the reader's own validation -- Linux's checks --
    turns the lie into a cold boot, a panic or EIO, never a silent misread."""
    rig = Rig()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            k = rig.boot(NEG, KernelImage.of("7.2"))
            matrix.preserve(k)
            try:
                k2 = rig.kexec(k, NEG, KernelImage.of(liar, reads=lie))
            except Halted as e:
                assert outcome == "panic" and "LUO" in str(e)
                return
            if outcome == "cold boot":
                assert k2.kho_in is None and "disabling KHO revival" in out.getvalue()
                return
            with pytest.raises(LiveUpdateError) as e:
                matrix.retrieve(k2)
            assert outcome == "EIO" and e.value.errno == errno.EIO
    finally:
        rig.close()


def test_kexec_metadata_counts_kexecs_since_the_cold_boot() -> None:
    """kho-v3+: each kernel says who kexec'd it and how many kexecs led here."""
    rig, out = Rig(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            k = rig.boot("kho=on", KernelImage.of("7.1"))
            for _ in range(3):
                k = rig.kexec(k, "kho=on", KernelImage.of("7.1"))
    finally:
        rig.close()
    hops = [line.split("KHO: ")[1] for line in out.getvalue().splitlines()
            if "KHO: exec from" in line]
    assert hops == [f"exec from: 7.1.0-lu (count {n})" for n in (1, 2, 3)]


def test_7_2_has_no_array_limits_but_luo_v1_does() -> None:
    """luo-v5 chains carry 130 files in one session (three kho_blocks); the same session
    negotiated down to 6.19's luo-v1 arrays (128 per session) is refused at the load."""
    rig = Rig()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k = rig.boot(NEG, KernelImage.of("7.2"))
            assert isinstance(k.luo, LuoSessions)
            dev = k.luo.open()
            _, (session,) = matrix.ioctl(k, dev, "CREATE_SESSION", fd=0, name=b"many")
            for token in range(130):
                m = k.new_memfd(f"f{token}")
                m.truncate(4096)
                m.pwrite(token.to_bytes(4, "little"), 0)
                matrix.ioctl(k, session, "SESSION_PRESERVE_FD", [kmemfd.open_file(m)], fd=3,
                           token=token)
            with pytest.raises(LiveUpdateError) as e:
                kexec.file_load(k, KernelImage.of("6.19").encode(), NEG)
            assert "session 'many' holds 130 files, luo-v1 holds 128" in e.value.message
            k2 = rig.kexec(k, NEG, KernelImage.of("7.2"))
            assert isinstance(k2.luo, LuoSessions)
            dev2 = k2.luo.open()
            _, (s2,) = matrix.ioctl(k2, dev2, "RETRIEVE_SESSION", fd=0, name=b"many")
            for token in (0, 62, 63, 126, 129):  # both sides of each block boundary
                _, (f,) = matrix.ioctl(k2, s2, "SESSION_RETRIEVE_FD", fd=0, token=token)
                assert f.private.pread(4, 0) == token.to_bytes(4, "little")
    finally:
        rig.close()


@pytest.mark.parametrize("gen, kind, outcome, reason", [
    ("7.2", "radix_loop", "cold boot", "reached twice"),
    ("7.1", "radix_outside_ram", "cold boot", "outside RAM"),
    ("7.2", "compatible", "cold boot", "kho-v9"),
    ("7.2", "luo_compatible", "panic", "luo_ser compatible is b'luo-v9'"),
])
def test_a_damaged_radix_or_luo_ser_handover(gen: str, kind: str, outcome: str,
                                             reason: str) -> None:
    """The booting kernel's own validation of kho-v3/v4 and luo-v5 handovers (kho_corrupt
    damages them after the reboot path's finalize)."""
    rig, out = Rig(), io.StringIO()
    line = f"kho=on liveupdate=on test_kho=1 kho_corrupt={kind}"
    try:
        with contextlib.redirect_stdout(out):
            k = rig.boot(line, KernelImage.of(gen))
            matrix.preserve(k)
            try:
                k2 = rig.kexec(k, "kho=on liveupdate=on test_kho=1", KernelImage.of(gen))
            except Halted as e:
                assert outcome == "panic" and reason in str(e), str(e)
                return
        assert outcome == "cold boot" and k2.kho_in is None
        setup = [x for x in out.getvalue().splitlines() if "KHO: setup:" in x]
        assert setup and reason in setup[-1], setup
    finally:
        rig.close()


@pytest.mark.parametrize("gen, panics", [("7.3", True), ("7.2", False)])
def test_liveupdate_off_still_reads_the_incoming_luo_data_on_7_3(gen: str, panics: bool) -> None:
    """7.3.4's luo_early_startup is an early_initcall that checks only kho_is_enabled: a
    damaged LUO handover panics the next kernel even with liveupdate=off; 7.2 (as modelled)
    does not look at it."""
    rig, out = Rig(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            k = rig.boot("kho=on liveupdate=on kho_corrupt=luo_compatible", KernelImage.of(gen))
            matrix.preserve(k)
            try:
                k2 = rig.kexec(k, "kho=on liveupdate=off", KernelImage.of(gen))
            except Halted as e:
                assert panics and "luo-v9" in str(e), str(e)
                return
        assert not panics and k2.luo is None and k2.kho_in is not None
    finally:
        rig.close()


def test_liveupdate_off_reads_an_intact_handover_without_a_device_on_7_3() -> None:
    rig, out = Rig(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            k = rig.boot("kho=on liveupdate=on", KernelImage.of("7.3"))
            matrix.preserve(k)
            k2 = rig.kexec(k, "kho=on liveupdate=off", KernelImage.of("7.3"))
        assert k2.luo is None  # no /dev/liveupdate: the files stay reserved, unreachable
        assert "luo: Retrieved live update data, liveupdate number: 1" in out.getvalue()
    finally:
        rig.close()
