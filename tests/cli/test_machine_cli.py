"""luoctl machine / luoctl kho against a real background machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]


def luoctl(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LUOCTL, *args], capture_output=True, text=True, timeout=120,
                          env={"LIVEUPDATE_MACHINE": str(folder), "PATH": "/usr/bin:/bin"})


def test_machine_lifecycle(tmp_path: Path) -> None:
    m = tmp_path / "m"
    r = luoctl(m, "machine", "start", "--memory", "1G", "--cmdline",
               "kho=on test_kho=1", "--json")
    assert r.returncode == 0, r.stderr
    try:
        st = json.loads(r.stdout)
        assert st["state"] == "running" and not st["kernel"]["kho_boot"]
        again = luoctl(m, "machine", "start")
        assert again.returncode == 1 and "already running" in again.stderr
        r = luoctl(m, "machine", "kexec", "load", "--kho-finalize")  # no LUO to do it
        assert r.returncode == 0 and "kexec: KHO finalized" in r.stdout
        assert "kexec: loaded images/default.img" in r.stdout
        r = luoctl(m, "machine", "kexec", "exec", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["kernel"]["kho_boot"]
        r = luoctl(m, "kho", "status", "--json")
        kho = json.loads(r.stdout)
        # test_kho's 8 MiB and its folios_info array as a KHO vmalloc area (6.18+): one
        # block page and one chunk page
        assert kho["kho_boot"] and kho["in"]["restored_pages"] == 2048 + 2
        assert kho["out"]["scratch"] == kho["in"]["scratch"]
        r = luoctl(m, "kho", "inspect", "--finalize", "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["memory"]["pages"] == kho["out"]["preserved_pages"]
        assert [s["name"] for s in rep["subtrees"]] == ["kho_test"]
        r = luoctl(m, "machine", "console")
        assert "KHO restore succeeded" in r.stdout
        assert r.stdout.count("Linux version") == 2
        r = luoctl(m, "machine", "run", "--", sys.executable, "-c", "raise SystemExit(3)")
        assert r.returncode == 3
    finally:
        r = luoctl(m, "machine", "poweroff")
    assert r.returncode == 0 and "powered off" in r.stdout
    r = luoctl(m, "machine", "status")
    assert r.returncode == 1 and r.stderr.startswith("luoctl: error: no machine at")


def test_power_cycle_out_of_panic(tmp_path: Path) -> None:
    m = tmp_path / "m"
    r = luoctl(m, "machine", "start", "--memory", "1G", "--cmdline", "kho=on test_panic=boom")
    try:
        assert r.returncode == 1 and "panic" in r.stderr and "test_panic: boom" in r.stderr
        r = luoctl(m, "machine", "power-cycle", "--cmdline", "kho=on", "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["state"] == "running" and st["memory"] == 1 << 30
    finally:
        luoctl(m, "machine", "poweroff")


def test_image_create(tmp_path: Path) -> None:
    m = tmp_path / "m"
    r = luoctl(m, "image", "create", "old", "--release", "6.17.0-lu", "--kho-bitmap-bytes",
               "512", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kho_bitmap_bytes"] == 512 and info["release"] == "6.17.0-lu"
    assert info["kho_core"] == "6.16" and info["luo"] == "none"  # no LUO before 6.19
    assert Path(info["path"]).read_bytes().startswith(b"LUKIMG01")
    r = luoctl(m, "image", "create", "old")
    assert r.returncode == 1 and "exists" in r.stderr
    r = luoctl(m, "image", "create", "bad/name")
    assert r.returncode == 1 and "must be letters" in r.stderr
    r = luoctl(m, "image", "create", "tiny", "--load-size", "1000")
    assert r.returncode == 1 and "page multiple" in r.stderr
    r = luoctl(m, "machine", "start", "--memory", "1G", "--image", "images/old.img", "--json")
    try:
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["kernel"]["release"] == "6.17.0-lu"
    finally:
        luoctl(m, "machine", "poweroff")


def test_machine_memory_read_write(tmp_path: Path) -> None:
    m = tmp_path / "m"
    r = luoctl(m, "machine", "start", "--memory", "256M")
    assert r.returncode == 0, r.stderr
    try:
        r = luoctl(m, "machine", "memory", "write", "0x9f100", "4b484f21")
        assert r.returncode == 0 and "wrote 4 bytes at 0x9f100" in r.stdout, r.stderr
        r = luoctl(m, "machine", "memory", "read", "0x9f0f8", "16")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("0x000000000009f0f8: 00 00 00 00 00 00 00 00 4b 48 4f 21")
        assert r.stdout.rstrip().endswith("|........KHO!....|")
        raw = subprocess.run([*LUOCTL, "machine", "memory", "read", "0x9f100", "4", "--raw"],
                             capture_output=True, timeout=60,
                             env={"LIVEUPDATE_MACHINE": str(m), "PATH": "/usr/bin:/bin"})
        assert raw.returncode == 0 and raw.stdout == b"KHO!"
        blob = tmp_path / "blob.bin"
        blob.write_bytes(bytes(range(256)) * 4096)  # 1 MiB through --file and --out
        assert luoctl(m, "machine", "memory", "write", "0x1000000", "--file",
                      str(blob)).returncode == 0
        out = tmp_path / "out.bin"
        r = luoctl(m, "machine", "memory", "read", "16M", "1M", "--out", str(out))
        assert r.returncode == 0 and out.read_bytes() == blob.read_bytes()
        end = 256 << 20
        for args in (("read", hex(end - 8), "16"), ("write", hex(end - 2), "00112233"),
                     ("read", "0x1" + "0" * 12, "1"), ("write", "0x100", "xyz")):
            r = luoctl(m, "machine", "memory", *args)
            assert r.returncode == 1 and r.stdout == "", (args, r)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert r.stderr.startswith("luoctl: error:")
        assert "outside RAM" in luoctl(m, "machine", "memory", "read", hex(end),
                                       "1").stderr
        r = luoctl(m, "machine", "memory", "read", hex(end - 4), "4")  # the last bytes: fine
        assert r.returncode == 0, r.stderr
    finally:
        luoctl(m, "machine", "poweroff")
