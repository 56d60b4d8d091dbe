"""luod's pre-flight and its check after prepare for the file components ``7.3+posted``
adds (vfio, iommufd, huge-memfd): a next kernel without their handlers is refused only when
a client actually preserves a file of one -- a memfd-only host goes to plain 7.3.

The pure plan first (:func:`liveupdate.luod.preflight.plan`), then whole updates through
luod against the fake kernel (tests/luod/fake_kernel.py); tests/e2e/test_device_vm.py runs
both on the machine, with the VMM's real device files."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdate.abi import image
from liveupdate.errors import LiveUpdateError
from liveupdate.luod import preflight
from liveupdate.luod.state import Phase
from tests.luod.fake_kernel import FakeLuo, Rebooted
from tests.luod.test_orchestrator import DATA, Rig, _memfd

POSTED, PLAIN = "7.3.0-lu-posted", "7.3.0-lu"
LINE = "kho=on liveupdate=on"


def _plan(tmp: Path, reader: str, this_line: str = LINE) -> dict[str, object]:
    path = tmp / "next.img"
    path.write_bytes(image.KernelImage.of(reader).encode())
    return preflight.plan(str(path), None, LINE, POSTED, this_line)


def test_plain_73_loads_and_names_what_it_lacks(tmp_path: Path) -> None:
    p = _plan(tmp_path, "7.3")
    assert p["lacks"] == {"huge-memfd": "huge-memfd-v1", "iommufd": "iommufd-v1",
                          "vfio": "vfio-pci-v1"}
    assert p["handover"] == {"mode": "native", "formats": {
        "kho": "kho-v4", "luo": "luo-v5", "flb": "luo-flb-v1", "memfd": "memfd-v2"}}


def test_plain_73_negotiated_names_what_it_lacks(tmp_path: Path) -> None:
    p = _plan(tmp_path, "7.3", f"{LINE} liveupdate_negotiate=on")
    assert sorted(p["lacks"]) == ["huge-memfd", "iommufd", "vfio"]  # type: ignore[call-overload]


def test_posted_to_posted_lacks_nothing(tmp_path: Path) -> None:
    p = _plan(tmp_path, "7.3+posted")
    assert p["lacks"] == {}
    formats = p["handover"]["formats"]  # type: ignore[index]
    assert formats["vfio"] == "vfio-pci-v1" and formats["iommufd"] == "iommufd-v1"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, FakeLuo(POSTED))
    yield r
    r.stop()


def _update_to_plain(rig: Rig, component: str) -> threading.Event:
    d = rig.start()
    path = rig.tmp / "plain.img"
    path.write_bytes(image.KernelImage.of("7.3").encode())
    assert d.load_alone(str(path), "", None)["lacks"]["vfio"] == "vfio-pci-v1"
    fd = _memfd(DATA)
    cancelled = threading.Event()
    rig.client("vm0", on_prepare=lambda c: c.preserve(fd, 1, component),
               on_cancel=lambda c, why: cancelled.set())
    return cancelled


def test_a_device_file_preserved_refuses_plain_73_after_prepare(rig: Rig) -> None:
    cancelled = _update_to_plain(rig, "vfio")
    d = rig.luods[0]
    with pytest.raises(LiveUpdateError) as e:
        d.update(None, "", None)
    assert e.value.errno == errno.EINVAL, e.value
    assert "client vm0 preserved vfio files" in e.value.message
    assert "vfio-pci-v1" in e.value.message and "Linux would EIO" in e.value.message
    assert cancelled.wait(10)  # told before any freeze: it never paused
    assert d.phase is Phase.NORMAL and "vfio-pci-v1" in d.last_error
    assert rig.luo.preserved() == {} and rig.luo.boot == 0  # no kexec, nothing kept


def test_a_memfd_only_host_goes_to_plain_73(rig: Rig) -> None:
    cancelled = _update_to_plain(rig, "memfd")
    with pytest.raises(Rebooted) as rebooted:
        rig.luods[0].update(None, "", None)
    assert not cancelled.is_set()
    incoming = rebooted.value.luo.incoming  # what the next kernel got: vm0's memfd
    assert any(s.endswith(":vm0") and 1 in files for s, files in incoming.items()), incoming
