"""The harness's host side without QEMU: what it refuses before booting anything, how it
reads what a guest wrote, and QMP spoken by a peer on a real Unix socket."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel import capture, vm
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.qmp import Listener


@pytest.mark.parametrize("bad", ["/tmp/a b", "/tmp/x;touch y", "/tmp/a,b", "/tmp/$HOME"])
def test_paths_that_reach_a_shell_or_qemu_options_must_be_plain(bad: str) -> None:
    with pytest.raises(LiveUpdateError, match="use only letters"):
        vm.plain_path(Path(bad), "results folder")
    assert vm.plain_path(Path("/tmp/ok-1.2_x+y"), "x") == Path("/tmp/ok-1.2_x+y")


def test_capture_never_replaces_a_folder_that_is_not_a_capture(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    img = Image(tmp_path / "no-image", {"kernel_release": "7.3.4"})
    with pytest.raises(LiveUpdateError, match="not empty"):
        capture.capture(img, tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_stage_status_the_guest_garbled_is_an_error(tmp_path: Path) -> None:
    run = vm.Run(tmp_path, [], 0.0)
    assert run.stage_rc(1) is None
    (tmp_path / "stage1.done").write_text("0\n")
    assert run.stage_rc(1) == 0
    (tmp_path / "stage2.done").write_text("\x00garbage")
    with pytest.raises(LiveUpdateError, match="not an exit status"):
        run.stage_rc(2)
    assert run.kexec_error() is None
    (tmp_path / "stage1.kexec-error").write_text("kexec_file_load failed [EPERM]\n")
    assert run.kexec_error() == "kexec_file_load failed [EPERM]"


def _qemu(path: str, replies: list[bytes], got: list[dict[str, object]]) -> None:
    """A QMP peer: connects as QEMU does (server=off), greets, then answers each command
    with the next canned lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rwb")
    f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    f.flush()
    for reply in replies:
        line = f.readline()
        if not line:
            break
        got.append(json.loads(line))
        f.write(reply)
        f.flush()
    f.close()
    s.close()


def test_qmp_skips_events_and_reports_errors_and_garbage_as_errors() -> None:
    listener = Listener()
    got: list[dict[str, object]] = []
    replies = [b'{"return": {}}\n',
               b'{"event": "STOP"}\n{"return": {}}\n',
               b'{"error": {"class": "GenericError", "desc": "no such file"}}\n',
               b'{"error": "just a string"}\n',
               b"not json\n"]
    peer = threading.Thread(target=_qemu, args=(str(listener.path), replies, got))
    peer.start()
    try:
        qmp = listener.accept(10.0, lambda: True)
        assert qmp.execute("stop") == {}
        with pytest.raises(LiveUpdateError, match="QMP pmemsave: no such file"):
            qmp.execute("pmemsave", val=0, size=4096, filename="/nonexistent/x")
        with pytest.raises(LiveUpdateError, match="just a string"):
            qmp.execute("cont")
        with pytest.raises(LiveUpdateError, match="not a JSON object"):
            qmp.execute("cont")
        qmp.close()
    finally:
        listener.close()
        peer.join()
    assert [m["execute"] for m in got] == ["qmp_capabilities", "stop", "pmemsave", "cont",
                                           "cont"]
    assert got[2]["arguments"] == {"val": 0, "size": 4096, "filename": "/nonexistent/x"}
    assert not listener.dir.exists()


def test_qemu_that_exits_before_connecting_is_reported_at_once() -> None:
    listener = Listener()
    try:
        with pytest.raises(LiveUpdateError, match="exited before it connected"):
            listener.accept(60.0, lambda: False)
    finally:
        listener.close()
