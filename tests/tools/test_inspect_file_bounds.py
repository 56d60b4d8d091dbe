"""luoctl inspect FILE reads regular files only, never more than 16 MiB, and does not trust
st_size (debugfs and sysfs files report 0 or 4096 whatever they hold)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.tools import inputfile
from tests.tools.cli import inspect


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_what_is_not_a_regular_file_is_refused_at_once(kind: str, tmp_path: Path) -> None:
    path = Path(kind) if kind.startswith("/") else tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: opening it blocking would wait forever
    rc, rep, err = inspect(path)
    want = {"/dev/zero": "is a character device", "fifo": "is a FIFO"}[kind]
    assert rc == 1 and rep == {} and want in err and "EINVAL" in err
    assert "Traceback" not in err


def test_a_directory_is_eisdir(tmp_path: Path) -> None:
    """(click refuses one on the command line already; the reader does too)"""
    with pytest.raises(LiveUpdateError) as e:
        inputfile.read_capped(tmp_path)
    assert e.value.errno == errno.EISDIR and "is a directory" in e.value.message


def test_more_than_16_mib_is_efbig_naming_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(inputfile.MAX_INPUT + 1)  # sparse: costs no disk
    rc, _, err = inspect(big)
    assert rc == 1 and "more than 16777216 bytes (16 MiB)" in err and "EFBIG" in err
    with open(big, "r+b") as f:
        f.truncate(inputfile.MAX_INPUT)  # exactly at the limit: read, then not recognized
    rc, _, err = inspect(big)
    assert rc == 1 and "16777216 bytes: not a KHO root FDT" in err


def test_a_file_whose_st_size_is_0_is_read_to_its_end() -> None:
    """/proc files, like debugfs and sysfs ones, say 0 bytes and hold more."""
    assert os.stat("/proc/version").st_size == 0
    want = len(Path("/proc/version").read_bytes())
    assert inputfile.read_capped(Path("/proc/version")) == Path("/proc/version").read_bytes()
    rc, _, err = inspect("/proc/version")
    assert rc == 1 and f"{want} bytes: not a KHO root FDT" in err


def test_a_sysfs_type_file_that_never_ends_is_not_read_forever(tmp_path: Path,
                                                               cap72: Path) -> None:
    """setup_data/N/type is read to check N is KHO's; a crafted one is ignored, not read
    without end."""
    node = tmp_path / "setup_data" / "1"
    node.mkdir(parents=True)
    (node / "data").write_bytes((cap72 / "setup_data.bin").read_bytes()[16:])
    (node / "type").symlink_to("/dev/zero")
    rc, rep, err = inspect(node / "data")
    assert rc == 0 and rep["kind"] == "setup_data", err


@pytest.mark.parametrize("ram", ["/dev/zero", "fifo"])
def test_ram_that_is_not_a_regular_file_is_refused_at_once(ram: str, tmp_path: Path) -> None:
    path = Path(ram) if ram.startswith("/") else tmp_path / ram
    if ram == "fifo":
        os.mkfifo(path)
    rc, _, err = inspect("--ram", path)
    assert rc == 1 and "RAM is a raw image or an ELF core" in err and "EINVAL" in err
