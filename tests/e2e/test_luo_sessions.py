"""LUO sessions (6.19 to 7.3) across real kexecs: the mainline self-tests (spec/luo.md 6.1,
6.2), limits, crash safety, and Linux's behaviour between generations (spec/luo.md 7).

The self-test cases run per generation on one machine of that generation (:func:`same`), as
upstream's run one after another on one host: each must leave LUO as it found it -- no
outgoing session, the device closed, every incoming session finished -- which is checked
after each, so a case that leaks fails itself rather than the next one."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from liveupdate.abi import generations, luo_session
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient, RemoteRam, start
from liveupdate.tools import report
from tests.e2e import luo_prog
from tests.e2e.conftest import CMDLINE, IMAGES, Machine
from tests.e2e.luo_prog import luo, update

Shared = Callable[[str], MachineClient]
# the cases on one machine per generation: one xdist group each, so they meet on one worker
ON_ONE_MACHINE = [pytest.param(g, marks=pytest.mark.xdist_group(f"luo-{g}"))
                  for g in luo_prog.SESSION_GENERATIONS]


@pytest.fixture(scope="module")
def per_gen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MachineClient]]:
    running: list[tuple[subprocess.Popen[bytes], MachineClient]] = []
    machines: dict[str, MachineClient] = {}

    class Machines(dict[str, MachineClient]):
        def __missing__(self, gen: str) -> MachineClient:
            folder = tmp_path_factory.mktemp(f"luo-{gen}") / "m"
            images = folder / "disk" / "images"
            images.mkdir(parents=True)
            for name, img in IMAGES.items():
                (images / f"{name}.img").write_bytes(img.encode())
            proc, m = start(str(folder), memory=1 << 30, cmdline=CMDLINE,
                            image=f"images/{gen}.img", log=f"{folder}.log")
            running.append((proc, m))
            m.booted(60)
            self[gen] = m
            return m

    machines = Machines()
    yield machines
    for proc, m in running:
        m.shutdown()
        proc.wait(30)


@pytest.fixture
def same(per_gen: dict[str, MachineClient]) -> Iterator[Shared]:
    """``same(gen)``: this module's machine of generation ``gen``; after the test, LUO on it
    must be as a fresh boot has it."""
    used: list[MachineClient] = []

    def get(gen: str) -> MachineClient:
        used.append(per_gen[gen])
        return used[-1]

    yield get
    for m in used:
        st = luo(m)
        left = {"outgoing": st["sessions"], "device_open": st["device_open"],
                "unfinished": [s["name"] for s in st["incoming"] if not s.get("finished")]}
        assert left == {"outgoing": [], "device_open": False, "unfinished": []}, left

LIVEUPDATE_C = r'''
out = {}
dev = k.open("/dev/liveupdate")
out["exclusive_open"] = err(k.open, "/dev/liveupdate")
a = create(dev, "duplicate-session-test")
out["create_duplicate_session"] = create(dev, "duplicate-session-test")
out["create_distinct_sessions"] = [type(create(dev, f"distinct-session-{i}")).__name__
                                   for i in (1, 2)]
s = create(dev, "preserve-memfd")
fd = memfd_with("hello liveupdate")
out["preserve_memfd"] = io(s, "SESSION_PRESERVE_FD", fd=fd, token=0x1234).get("errno", "ok")
out["memfd_size_frozen"] = err(k.ftruncate, fd, 1 << 20)
os.close(s)  # closing the session unpreserves
out["file_unharmed"] = read_text(fd)
out["size_unfrozen"] = err(k.ftruncate, fd, 1 << 20)
s = create(dev, "multi")
out["preserve_multiple_memfds"] = [preserve(s, t, f"data {t:x}") for t in (0xAAAA, 0xBBBB)]
out["token_reuse"] = preserve(s, 0xAAAA, "again")
s1, s2 = create(dev, "complex-session-1"), create(dev, "complex-session-2")
out["complex"] = [preserve(s1, 0x1111, "data"), preserve(s1, 0x2222, ""),
                  preserve(s2, 0x3333, "data"), preserve(s2, 0x4444, ""),
                  preserve(s2, 0x1111, "the same token in another session")]
r, w = os.pipe()
out["preserve_unsupported_fd"] = [io(s1, "SESSION_PRESERVE_FD", fd=r, token=9).get("errno"),
                                  io(s1, "SESSION_PRESERVE_FD", fd=dev, token=9).get("errno"),
                                  io(s1, "SESSION_PRESERVE_FD", fd=s2, token=9).get("errno")]
out["session_ioctl_on_device"] = io(dev, "SESSION_PRESERVE_FD", fd=r, token=1).get("errno")
out["device_ioctl_on_session"] = io(s1, "CREATE_SESSION", name=b"x").get("errno")
out["retrieve_unknown_session"] = retrieve(dev, "nope")
out["retrieve_fd_on_outgoing"] = io(s1, "SESSION_RETRIEVE_FD", token=0x1111).get("errno")
if G.get_name:
    n = create(dev, "get-name-test-session")
    out["get_name"] = io(n, "SESSION_GET_NAME")["name"].rstrip(b"\0").decode()
    n = create(dev, "A" * 63)
    out["get_name_max"] = len(io(n, "SESSION_GET_NAME")["name"].rstrip(b"\0"))
    out["get_name_reserved"] = io(n, "SESSION_GET_NAME", reserved=1).get("errno")
    fd = memfd_with("twice")
    io(s1, "SESSION_PRESERVE_FD", fd=fd, token=0x5555)
    out["double_preserve"] = io(s2, "SESSION_PRESERVE_FD", fd=fd, token=0x5555).get("errno")
else:
    entry = uapi.ioctl(uapi.Gen.V7_1, "SESSION_GET_NAME")
    buf = bytearray(entry.pack())
    out["get_name"] = err(k.ioctl, s1, entry.number, buf)
    out["truncated_name"] = type(create(dev, "B" * 80)).__name__
    out["truncated_name_exists"] = create(dev, "B" * 63)
print(json.dumps(out))
'''


@pytest.mark.parametrize("gen", ON_ONE_MACHINE)
def test_liveupdate_c_cases(same: Shared, gen: str) -> None:
    m = same(gen)
    got = luo_prog.run(m, LIVEUPDATE_C)
    common = {
        "exclusive_open": "EBUSY", "create_duplicate_session": "EEXIST",
        "create_distinct_sessions": ["int", "int"], "preserve_memfd": "ok",
        "memfd_size_frozen": "EPERM", "file_unharmed": "hello liveupdate",
        "size_unfrozen": "ok", "preserve_multiple_memfds": ["ok", "ok"],
        "token_reuse": "EEXIST", "complex": ["ok"] * 5,
        # a pipe is a file of Linux with no LUO handler (fget succeeds): ENOENT, as a device
        # or session fd
        "preserve_unsupported_fd": ["ENOENT", "ENOENT", "ENOENT"],
        "session_ioctl_on_device": "EINVAL", "device_ioctl_on_session": "EINVAL",
        "retrieve_unknown_session": "ENOENT", "retrieve_fd_on_outgoing": "EINVAL",
    }
    if luo_prog.row(gen).uapi == "7.1":  # GET_NAME and the global double-preserve check
        want = {**common, "get_name": "get-name-test-session", "get_name_max": 63,
                "get_name_reserved": "EINVAL", "double_preserve": "EBUSY"}
    else:
        want = {**common, "get_name": "EINVAL", "truncated_name": "int",
                "truncated_name_exists": "EEXIST"}
    assert got == want


KEXEC_SIMPLE_1 = r'''
dev = k.open("/dev/liveupdate")
state = create(dev, "kexec_simple_state")
preserve(state, 999, "2")
s = create(dev, "test-session")
preserve(s, 0x1A, "hello kexec world")
os.close(dev)  # sessions outlive the device fd
hold({"sessions": [state, s]})
'''

KEXEC_SIMPLE_2 = r'''
dev = k.open("/dev/liveupdate")
out = {}
state = retrieve(dev, "kexec_simple_state")
out["stage"] = restore_text(state, 999)
s = retrieve(dev, "test-session")
out["again"] = retrieve(dev, "test-session")
f1 = io(s, "SESSION_RETRIEVE_FD", token=0x1A)["fd"]
out["text"] = read_text(f1)
k.lseek(f1, 5, os.SEEK_SET)
f2 = io(s, "SESSION_RETRIEVE_FD", token=0x1A)["fd"]  # repeatable: the same open file
out["shared_offset"] = k.lseek(f2, 0, os.SEEK_CUR)
out["finish"] = io(s, "SESSION_FINISH").get("errno", "ok")
out["finish_again"] = io(s, "SESSION_FINISH").get("errno", "ok")
out["after_finish"] = io(s, "SESSION_RETRIEVE_FD", token=0x1A).get("errno")
out["still_readable"] = read_text(f1)
out["finish_state"] = io(state, "SESSION_FINISH").get("errno", "ok")
print(json.dumps(out))
'''


@pytest.mark.parametrize("gen", ON_ONE_MACHINE)
def test_luo_kexec_simple(same: Shared, gen: str) -> None:
    m = same(gen)
    number = luo(m)["liveupdate_number"]
    luo_prog.run(m, KEXEC_SIMPLE_1)
    st = update(m, gen)
    assert st["kernel"]["kho_boot"]
    assert luo(m)["liveupdate_number"] == number + 1
    assert luo_prog.run(m, KEXEC_SIMPLE_2) == {
        "stage": "2", "again": "EINVAL", "text": "hello kexec world", "shared_offset": 5,
        "finish": "ok", "finish_again": "ok", "after_finish": "ENOENT",
        "still_readable": "hello kexec world", "finish_state": "ok"}


MULTI_1 = r'''
dev = k.open("/dev/liveupdate")
fds = [create(dev, "multi-test-empty-1"), create(dev, "multi-test-empty-2")]
s1, s2 = create(dev, "multi-test-files-1"), create(dev, "multi-test-files-2")
preserve(s1, 0x1001, "Data for session files 1")
preserve(s2, 0x2002, "First file for session files 2")
preserve(s2, 0x3003, "Second file for session files 2")
closed = create(dev, "closed-before-kexec")
preserve(closed, 0x4004, "dropped")
os.close(closed)
hold({})
'''

MULTI_2 = r'''
dev = k.open("/dev/liveupdate")
out = {}
for name in ("multi-test-empty-1", "multi-test-empty-2"):
    s = retrieve(dev, name)
    out[name] = [io(s, "SESSION_RETRIEVE_FD", token=1).get("errno"),
                 io(s, "SESSION_FINISH").get("errno", "ok")]
s1, s2 = retrieve(dev, "multi-test-files-1"), retrieve(dev, "multi-test-files-2")
out["files"] = [restore_text(s1, 0x1001), restore_text(s2, 0x3003), restore_text(s2, 0x2002)]
out["finish"] = [io(s, "SESSION_FINISH").get("errno", "ok") for s in (s1, s2)]
out["closed"] = retrieve(dev, "closed-before-kexec")
print(json.dumps(out))
'''


@pytest.mark.parametrize("gen", ON_ONE_MACHINE)
def test_luo_multi_session(same: Shared, gen: str) -> None:
    m = same(gen)
    luo_prog.run(m, MULTI_1)
    update(m, gen)
    assert luo_prog.run(m, MULTI_2) == {
        "multi-test-empty-1": ["ENOENT", "ok"], "multi-test-empty-2": ["ENOENT", "ok"],
        "files": ["Data for session files 1", "Second file for session files 2",
                  "First file for session files 2"],
        "finish": ["ok", "ok"], "closed": "ENOENT"}


def test_unretrieved_sessions_are_dropped_at_the_next_kexec(lu: Machine) -> None:
    m = lu()
    luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\ns = create(dev, "once")\n'
                    'preserve(s, 1, "x")\nhold({})')
    update(m)
    assert luo_prog.run(m, 'k.open("/dev/liveupdate")\nprint(json.dumps(0))') == 0
    assert [s["name"] for s in luo(m)["incoming"]] == ["once"]  # known, never retrieved
    update(m)
    body = 'dev = k.open("/dev/liveupdate")\nprint(json.dumps(retrieve(dev, "once")))'
    assert luo_prog.run(m, body) == "ENOENT"
    assert luo(m)["liveupdate_number"] == 2


def test_stress_limits_of_the_6_19_format(lu: Machine) -> None:
    m = lu()
    body = r'''
dev = k.open("/dev/liveupdate")
out = {}
sessions = [create(dev, f"many-test-{i}") for i in range(820)]
out["sessions"] = [sum(isinstance(s, int) for s in sessions), sessions[-1]]
for s in sessions[:-1]:
    os.close(s)
s = create(dev, "many_files_session")
res = [preserve(s, t, f"file-data-{t}") for t in range(129)]
out["files"] = [res.count("ok"), res[-1]]
print(json.dumps(out))
'''
    # 6.19: ENOMEM at session 820 (819 fit the header), ENOSPC at file 129 (128 fit the array)
    assert luo_prog.run(m, body, timeout=300) == {"sessions": [819, "ENOMEM"],
                                                  "files": [128, "ENOSPC"]}


def test_closing_the_device_or_the_last_session_holder(lu: Machine) -> None:
    m = lu()
    free = m.kho_status()["free_pages"]
    body = r'''
dev = k.open("/dev/liveupdate")
s = create(dev, "keep")
preserve(s, 1, "kept", 8 << 20)
os.close(dev)
print(json.dumps("exiting with the session fd open"))
'''
    luo_prog.run(m, body)  # the process dies: its session fd goes with it
    st = luo(m)
    assert st["sessions"] == [] and not st["device_open"]
    assert m.kho_status()["free_pages"] == free  # unpinned, unpreserved, freed
    body = r'''
dev = k.open("/dev/liveupdate")
s = create(dev, "survives-device-close")
preserve(s, 1, "kept")
os.close(dev)
hold({})
'''
    luo_prog.run(m, body)
    assert [s["name"] for s in luo(m)["sessions"]] == ["survives-device-close"]
    update(m)
    assert luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\n'
                           's = retrieve(dev, "survives-device-close")\n'
                           'print(json.dumps(restore_text(s, 1)))') == "kept"


ZERO_COPY_1 = r'''
dev = k.open("/dev/liveupdate")
s = create(dev, "vm")
fd = k.memfd_create("guest", 2)
k.ftruncate(fd, 256 << 20)
mp = k.mmap(fd, 256 << 20)
fill(mp.view, 7)
if G.gen == uapi.Gen.V7_1:
    k.add_seals(fd, 0x2 | 0x4)  # F_SEAL_SHRINK | F_SEAL_GROW
k.lseek(fd, 4242, os.SEEK_SET)
assert io(s, "SESSION_PRESERVE_FD", fd=fd, token=0xBEEF).get("errno") is None
ext = k.extents(fd, 256 << 20)
mp.view[1 << 20 : (1 << 20) + 4] = b"LATE"
hold({"extents": ext, "digest": digest(mp.view), "seals": k.get_seals(fd)})
'''

ZERO_COPY_2 = r'''
dev = k.open("/dev/liveupdate")
s = retrieve(dev, "vm")
fd = io(s, "SESSION_RETRIEVE_FD", token=0xBEEF)["fd"]
mp = k.mmap(fd, 256 << 20)
print(json.dumps({"extents": k.extents(fd, 256 << 20), "digest": digest(mp.view),
                  "seals": k.get_seals(fd), "pos": k.lseek(fd, 0, os.SEEK_CUR),
                  "late": bytes(mp.view[1 << 20 : (1 << 20) + 4]).decode()}))
'''


@pytest.mark.parametrize("gen", ON_ONE_MACHINE)
def test_zero_copy_and_seals(same: Shared, gen: str) -> None:
    m = same(gen)
    before = luo_prog.run(m, ZERO_COPY_1)
    resident = m.status()["ram_resident"]
    update(m, gen)
    after = luo_prog.run(m, ZERO_COPY_2)
    assert after["extents"] == before["extents"] and after["pos"] == 4242
    assert after["digest"] == before["digest"] and after["late"] == "LATE"
    # v1 restores an unsealable memfd (F_SEAL_SEAL); v2 the exact seal set
    sealed = luo_prog.row(gen).memfd not in generations.DROPS_SEALS
    assert after["seals"] == (before["seals"] if sealed else 1)
    assert before["seals"] == (6 if sealed else 0)
    assert m.status()["ram_resident"] < resident * 1.1


def test_handover_decodes_byte_exact_with_the_abi_codec(lu: Machine) -> None:
    m = lu()
    luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\ns = create(dev, "inspect-me")\n'
                    'preserve(s, 0x77, "x", 3 << 20)\ne = create(dev, "empty")\nhold({})')
    st = update(m)
    mem = PhysMem(RemoteRam(m, st["memory"]))
    root = report.describe(m.debugfs("in/fdt"), mem)  # before the first open: all intact
    luo_sub = next(s for s in root["subtrees"] if s["name"] == "LUO")
    rep = luo_sub["content"]
    assert rep["kind"] == "luo-session" and rep["liveupdate_number"] == 1
    sessions = rep["sessions"]["list"]
    assert [s["name"] for s in sessions] == ["inspect-me", "empty"]
    (f,) = sessions[0]["files"]
    assert f["token"] == "0x77" and f["memfd"]["size"] == 3 << 20
    assert f["memfd"]["folios"]["count"] == 2  # a 2 MiB and a 1 MiB folio
    fdt_phys = int(luo_sub["fdt"], 16)
    blob = mem.read_fdt(fdt_phys, "LUO FDT")
    assert blob == luo_session.encode_luo_fdt(1, int(rep["session_header"], 16))
    decoded = luo_session.decode_sessions(mem, int(rep["session_header"], 16))
    rows = [(s.name, s.files_phys, len(s.files)) for s in decoded]
    header = mem.read(int(rep["session_header"], 16), luo_session.SESSION_BLOCK)
    assert header == luo_session.encode_sessions(rows)
    files = mem.read(decoded[0].files_phys, luo_session.FILE_BLOCK)
    assert files == luo_session.encode_files(list(decoded[0].files))


@pytest.mark.parametrize("writer, reader, why", [
    ("6.19", "7.0", "it requires luo-flb-v1 (flb) -- Linux would panic"),
    ("6.19", "v3", "it cannot read luo-v1 (luo) -- Linux would panic"),
    ("6.19", "7.1", "it cannot read kho-v1 (kho) -- Linux would cold boot"),
])
def test_incompatible_images_are_refused_at_load(lu: Machine, writer: str, reader: str,
                                                 why: str) -> None:
    m = lu(writer)
    with pytest.raises(LiveUpdateError) as e:
        m.kexec_load(f"images/{reader}.img")
    assert "kexec_file_load" in e.value.message and why in e.value.message
    assert m.status()["state"] == "running"


def test_reboot_refuses_what_the_negotiated_formats_cannot_express(lu: Machine) -> None:
    """Negotiated 7.2 -> 6.19 (memfd-v1, no seals); a memfd sealed after the load makes
    reboot() fail before anything is frozen, naming the file and the format."""
    m = lu("7.2", "liveupdate_negotiate=on")
    m.kexec_load("images/6.19.img")  # this kernel's command line: negotiate on both
    plan = m.kho_status()["handover"]["plan"]
    assert plan == {"mode": "negotiated", "formats": {
        "kho": "kho-v1", "luo": "luo-v1", "flb": "none", "memfd": "memfd-v1"}}
    luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\ns = create(dev, "v2")\n'
                    'fd = memfd_with("sealed world", flags=2)\nk.add_seals(fd, 0x4)\n'
                    'io(s, "SESSION_PRESERVE_FD", fd=fd, token=1)\nhold({})')
    r = m.run([sys.executable, "-m", "liveupdate.userspace.kexec", "-e"])
    assert r["status"] == 1 and "token 0x1 is sealed" in r["stderr"] \
        and "memfd-v1" in r["stderr"], r
    assert m.status()["state"] == "running"
    assert [s["name"] for s in luo(m)["sessions"]] == ["v2"]  # nothing frozen, nothing lost
    assert luo(m)["sessions"][0]["files"][0]["state"] == "prepared"


def test_kho_inspect_decodes_a_7_2_handover(lu: Machine) -> None:
    """luoctl kho inspect on a live 7.2 kernel: kho-v4 root, radix map, luo-v5 over
    kho_block, kexec-metadata -- read from RAM."""
    m = lu("7.2")
    luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\ns = create(dev, "vm")\n'
                    'preserve(s, 7, "hello")\nhold({})')
    r = subprocess.run([sys.executable, "-m", "liveupdate.cli.luoctl", "kho", "inspect",
                        "--dir", m.dir, "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["compatible"] == "kho-v4" and rep["memory"]["format"] == "radix"
    subs = {s["name"]: s for s in rep["subtrees"]}
    assert subs["kexec-metadata"]["content"]["kexec_count"] == 1
    luo_rep = subs["LUO"]["content"]
    assert luo_rep["kind"] == "luo-v5" and subs["LUO"]["blob_size"] == 32
    assert report.errors(rep) == []


def test_rollback_and_roll_forward_three_hops(lu: Machine) -> None:
    """7.2 -> 6.19 (rollback) -> 7.2 (roll-forward) -> 6.19, real kexecs, negotiated each
    time; the memfd comes back byte for byte after every hop and is preserved again."""
    m = lu("7.2", "liveupdate_negotiate=on")  # kept by every kexec: negotiate on both
    luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\ns = create(dev, "vm")\n'
                    'preserve(s, 7, "guest memory " * 300)\nhold({})')
    body = r'''
dev = k.open("/dev/liveupdate")
s = retrieve(dev, "vm")
text = restore_text(s, 7)
io(s, "SESSION_FINISH")
n = create(dev, "vm")
preserve(n, 7, text)
hold(text == "guest memory " * 300)
'''
    for hop, (gen, kho) in enumerate((("6.19", "kho-v1"), ("7.2", "kho-v1"),
                                      ("6.19", "kho-v1"))):
        update(m, gen)
        st = m.kho_status()
        assert st["release"] == generations.RELEASES[gen].release, (hop, st["release"])
        assert st["in"]["format"] == kho and st["in"]["negotiated"] is not None, st["in"]
        assert st["in"]["negotiated"]["formats"]["memfd"] == "memfd-v1"
        assert luo_prog.run(m, body) is True, hop


@pytest.mark.parametrize("writer, reader, outcome", [
    ("6.19", "7.0", "panic: luo-flb"),
    ("6.19", "v3", "panic: subsystems"),
    ("7.2", "6.19", "cold boot"),
])
def test_linux_behaviour_with_the_refusal_off(lu: Machine, writer: str, reader: str,
                                              outcome: str) -> None:
    m = lu(writer, "liveupdate_compat=off")
    luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\ns = create(dev, "x")\n'
                    'preserve(s, 1, "data")\nhold({})')
    cmdline = f"{CMDLINE} liveupdate_compat=off"
    if outcome.startswith("panic"):
        with pytest.raises(LiveUpdateError) as e:
            update(m, reader, cmdline)
        assert e.value.errno == errno.EIO
        st = m.wait_state("panic", timeout=60)
        assert "LUO" in st["reason"] and outcome.split(": ")[1] in st["reason"], st
        return
    off = m.status()["console_bytes"]
    update(m, reader, cmdline)  # a KHO root it does not read: the handover is ignored
    assert m.kho_status()["kho_boot"] is False
    m.wait("KHO: disabling KHO revival: -22", offset=off, timeout=30)
    body = 'dev = k.open("/dev/liveupdate")\nprint(json.dumps(retrieve(dev, "x")))'
    assert luo_prog.run(m, body) == "ENOENT"  # nothing came across


def test_flb_lives_from_first_preserve_to_last_finish(lu: Machine) -> None:
    m = lu("7.1", "luo_flb=1")
    luo_prog.run(m, 'dev = k.open("/dev/liveupdate")\na, b = create(dev, "a"), '
                    'create(dev, "b")\npreserve(a, 1, "one")\npreserve(b, 2, "two")\n'
                    'c = create(dev, "c")\npreserve(c, 3, "three")\nos.close(c)\nhold({})')
    assert luo(m)["flbs"] == [{"name": "test-flb-v1", "count": 2}]
    boot = m.status()["kernel"]["boot_id"]
    off = m.status()["console_bytes"]
    update(m, "7.1")
    body = r'''
dev = k.open("/dev/liveupdate")
a, b = retrieve(dev, "a"), retrieve(dev, "b")
out = [restore_text(a, 1)]
io(a, "SESSION_FINISH")
out.append(io(b, "SESSION_FINISH").get("errno", "ok"))  # b's file never retrieved
print(json.dumps(out))
'''
    assert luo_prog.run(m, body) == ["one", "ok"]
    line = m.wait("luo_flb: retrieve: .*", offset=off)["line"]
    assert line.endswith(f"flb from boot {boot}")
    m.wait("luo_flb: finish: state freed", offset=off)
