"""luoctl inspect's command line: usage, help, and a map range outside RAM refused end to
end."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from liveupdate.abi import kho
from tests.tools.cli import inspect, luoctl
from tests.tools.conftest import write_example


def test_usage_errors_exit_2_with_the_reason(tmp_path: Path) -> None:
    for args, why in ((["inspect"], "give FILE, --ram RAM, or both"),
                      (["inspect", "x", "--extract", str(tmp_path)], "need --ram"),
                      (["inspect", "x", "--ram", "y", "--root", "0x1000"], "no FILE"),
                      (["inspect", "--ram", "y", "--root", "0x1001"], "page-aligned")):
        p = luoctl(*args)
        assert p.returncode == 2 and why in p.stderr, (args, p.stderr)


def test_help_shows_every_input_form_with_an_example() -> None:
    p = luoctl("inspect", "--help")
    assert p.returncode == 0
    for want in ("setup_data/1/data", "debug/kho/out/fdt", "out/sub_fdts/LUO", "--ram ram.raw",
                 "--ram ram.elf --extract", "--root 0x", "dump-guest-memory", "Exit status"):
        assert want in p.stdout, want


def test_the_exit_status_text_says_what_a_truncated_blob_gives(tmp_path: Path) -> None:
    """A truncated debugfs out/fdt lists unreadable parts and exits 0: the help says so,
    rather than '0 when everything decoded'."""
    p = luoctl("inspect", "--help")
    text = " ".join(p.stdout.split())
    assert ("Exit status: 0 when everything that is there decoded (a truncated debugfs blob "
            "is reported, not an error: what was cut off is listed as unreadable), 1 on any "
            "error") in text
    root = kho.LiveRoot(kho.KHO_V4, 0x53B000)
    root.add_subtree("kexec-metadata", 0x550000, 73)
    size = len(root.blob)  # out/fdt keeps the size of fs_initcall time
    root.add_subtree("LUO", 0x24B4000, 32)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fdt").write_bytes(root.blob[:size])
    rc, rep, err = inspect(tmp_path / "out" / "fdt")
    assert rc == 0 and rep["kind"] == "truncated-fdt" and rep["unreadable"], err


def test_a_chunk_entry_far_past_ram_is_refused_not_reported_as_a_range(tmp_path: Path) -> None:
    ex = write_example(tmp_path, "6.19")
    p = luoctl("inspect", "--json", "--ram", str(ex / "ram.img"), str(ex / "setup_data.bin"))
    assert p.returncode == 0, p.stderr
    first = int(json.loads(p.stdout)["root"]["preserved_memory_map"], 16)
    far = 1 << 44  # 16 TiB, in a 1 GiB machine; aligned to the bitmap span of any order <= 17
    with open(ex / "ram.img", "r+b") as f:
        f.seek(first + 8)
        order = struct.unpack("<I", f.read(4))[0]
        f.seek(first + 16)
        f.write(struct.pack("<Q", far))  # entry 0's phys_start
    p = luoctl("inspect", "--json", "--ram", str(ex / "ram.img"), str(ex / "setup_data.bin"))
    assert p.returncode == 1
    err = json.loads(p.stdout)["root"]["memory"]["error"]
    assert f"chunk {first:#x} entry 0 (order {order}, phys_start {far:#x})" in err
    assert "outside RAM" in err and "EFAULT" in err
    assert "outside RAM" in p.stderr and "Traceback" not in p.stderr
