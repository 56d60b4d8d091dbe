"""luoctl example, capture and inspect on real files: in process (``tests.tools.cli``), and
as its own process where a process is what is checked (capture's machines, one error line)."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from liveupdate.abi import kho
from tests.tools.cli import LUOCTL, luoctl


def process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LUOCTL, *args], capture_output=True, text=True, timeout=120)



def make_example(tmp: Path, *extra: str) -> dict[str, Any]:
    proc = luoctl("example", "--out", str(tmp), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def inspect_json(*args: str) -> tuple[int, dict[str, Any], str]:
    proc = luoctl("inspect", "--json", *args)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}, proc.stderr


@pytest.mark.parametrize("generation, bitmap", [("6.19", "4096"), ("v3", "512")])
def test_example_decodes_end_to_end(tmp_path: Path, generation: str, bitmap: str) -> None:
    info = make_example(tmp_path, "--generation", generation, "--bitmap-bytes", bitmap,
                        "--vm-memory", "8M")
    rc, rep, err = inspect_json("--ram", info["ram"], info["setup_data"])
    assert rc == 0, err
    root = rep["root"]
    assert rep["kho_data"]["fdt_size"] == 4096 and len(rep["scratch"]["areas"]) == 2
    assert root["memory"]["pages"] == info["preserved_pages"]
    assert root["memory"]["bitmap_bytes"] == int(bitmap)
    names = [s["name"] for s in root["subtrees"]]
    # 6.19 builds the root live (reverse order of addition), v3 sequentially
    want = ["memblock", "kho_test", "LUO"]
    assert names == (want[::-1] if generation == "6.19" else want)
    luo = next(s for s in root["subtrees"] if s["name"] == "LUO")["content"]
    if generation == "6.19":
        sessions = luo["sessions"]["list"]
        assert [s["name"] for s in sessions] == ["vm1", "empty"]
        mfd = sessions[0]["files"][0]["memfd"]
    else:
        mfd = luo["files"]["files"][0]["memfd"]
    assert mfd["folios"]["count"] == 5 and mfd["folios"]["dirty"] == 5
    assert mfd["size"] == (4 * 512 + 1) * 4096


@pytest.mark.parametrize("writer, reader, negotiate", [
    *[(g, g, False) for g in ("6.16", "6.18", "v3", "6.19", "7.0", "7.1", "7.2")],
    ("7.2", "6.19", True), ("6.19", "7.2", True),
])
def test_inspect_decodes_a_captured_handover_of_every_generation(
        tmp_path: Path, writer: str, reader: str, negotiate: bool) -> None:
    """luoctl capture (a real kernel's RAM at the jump) then luoctl inspect --ram."""
    proc = process("capture", "--from", writer, "--to", reader, "--out", str(tmp_path),
                  "--json", *(["--negotiate"] if negotiate else []))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    rc, rep, err = inspect_json("--ram", info["ram"], info["setup_data"])
    assert rc == 0, err
    root = rep["root"]
    kho_compat = {"kho-v1-512": "kho-v1"}.get(info["handover"]["formats"]["kho"],
                                              info["handover"]["formats"]["kho"])
    assert root["compatible"] == kho_compat
    assert root["negotiated"] == (info["handover"]["mode"] == "negotiated")
    assert root["memory"]["pages"] > 2048  # test_kho's 8 MiB, at least
    kinds = {s["name"]: s["content"]["kind"] for s in root["subtrees"]}
    assert kinds["kho_test"] == "kho-test"
    luo = info["handover"]["formats"].get("luo")
    if luo is not None:
        assert kinds["LUO"] == {"luo-v5": "luo-v5", "luo-v1": "luo-session",
                                "luo-v3": "luo-v3"}[luo]
    if root["negotiated"]:
        rec = next(s["content"] for s in root["subtrees"] if s["name"] == "lu-negotiation")
        assert rec["formats"] == info["handover"]["formats"]
    if kho_compat != "kho-v1":
        assert root["memory"]["format"] == "radix"


def test_inspect_plain_blobs_and_human_output(tmp_path: Path) -> None:
    blob = kho.encode_root_sequential(0x1000, [("LUO", 0x2000)])
    f = tmp_path / "fdt"
    f.write_bytes(blob)
    rc, rep, _ = inspect_json(str(f))
    assert rc == 0 and rep["subtrees"] == [{"name": "LUO", "fdt": "0x2000"}]
    proc = luoctl("inspect", str(f))
    assert proc.returncode == 0 and "preserved_memory_map: 0x1000" in proc.stdout


def test_inspect_rejects_garbage_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "junk"
    f.write_bytes(b"\xd0\x0d\xfe\xed" + b"\xff" * 60)
    proc = process("inspect", str(f))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("luoctl: error: ")
    assert "Traceback" not in proc.stderr
    proc = luoctl("inspect", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "No such file" in proc.stderr


def test_corrupt_memory_map_is_reported_in_place(tmp_path: Path) -> None:
    info = make_example(tmp_path)
    rc, rep, _ = inspect_json("--ram", info["ram"], info["setup_data"])
    first = int(rep["root"]["preserved_memory_map"], 16)
    with open(info["ram"], "r+b") as ram:
        ram.seek(first + 12)
        ram.write(struct.pack("<I", 300))  # num_elms > 255
    rc, rep, err = inspect_json("--ram", info["ram"], info["setup_data"])
    assert rc == 1 and "num_elms 300 > 255" in rep["root"]["memory"]["error"]
    assert "num_elms 300" in err
    assert len(rep["root"]["subtrees"]) == 3  # everything else still decoded


def test_help_is_documented() -> None:
    proc = luoctl("inspect", "--help")
    assert proc.returncode == 0 and "--ram" in proc.stdout and "Exit status" in proc.stdout
    proc = luoctl("example", "--memory", "lots", "--out", "/tmp/x")
    assert proc.returncode == 2 and "not a size" in proc.stderr
