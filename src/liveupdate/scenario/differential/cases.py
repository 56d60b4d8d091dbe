"""The differential suite's scenarios, written once as data (issue #24, "The cases").

Each scenario is a list of steps for :mod:`liveupdate.userspace.differential` (``kexec``
between the stages); :func:`batch` is every scenario, hand-written ones first, then those
generated from :data:`SEEDS`. Session names carry their scenario's id, so every scenario of
a batch can share one kernel (sessions are global).
"""

from __future__ import annotations

import random
from typing import Any

Step = dict[str, Any]
KEXEC: Step = {"op": "kexec"}
SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC = 1, 2, 4, 8, 0x10, 0x20
MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_NOEXEC_SEAL, MFD_EXEC = 1, 2, 8, 0x10
U64_MAX = (1 << 64) - 1
PAGE = 4096
SEEDS = (1, 2, 3, 5, 8, 13)


def device() -> Step:
    return {"op": "device", "as": "dev"}


def create(name: str | bytes, as_: str = "", **kw: Any) -> Step:
    raw = {"hex": name.hex()} if isinstance(name, bytes) else name
    st: Step = {"op": "ioctl", "target": "dev", "cmd": "CREATE_SESSION",
                "fields": {"name": raw}, **kw}
    if as_:
        st["as"] = as_
    return st


def retrieve(name: str | bytes, as_: str = "", **kw: Any) -> Step:
    st = create(name, as_, **kw)
    st["cmd"] = "RETRIEVE_SESSION"
    return st


def preserve(session: str, fd: Any, token: int, **kw: Any) -> Step:
    return {"op": "ioctl", "target": session, "cmd": "SESSION_PRESERVE_FD",
            "fields": {"fd": fd, "token": token}, **kw}


def take(session: str, token: int, as_: str = "", **kw: Any) -> Step:
    st: Step = {"op": "ioctl", "target": session, "cmd": "SESSION_RETRIEVE_FD",
                "fields": {"token": token}, **kw}
    if as_:
        st["as"] = as_
    return st


def finish(session: str, **kw: Any) -> Step:
    fields = kw.pop("fields", {})
    return {"op": "ioctl", "target": session, "cmd": "SESSION_FINISH", "fields": fields, **kw}


def get_name(session: str, **kw: Any) -> Step:
    fields = kw.pop("fields", {})
    return {"op": "ioctl", "target": session, "cmd": "SESSION_GET_NAME", "fields": fields,
            **kw}


def memfd(as_: str, size: int = PAGE, pages: list[int] | None = None, pos: int = 0,
          seals: int = 0, seed: int = 0, flags: int = MFD_ALLOW_SEALING) -> Step:
    return {"op": "memfd", "as": as_, "size": size, "pages": pages, "pos": pos,
            "seals": seals, "seed": seed, "flags": flags}


def view(fd: str) -> Step:
    return {"op": "view", "fd": fd}


def close(fd: str) -> Step:
    return {"op": "close", "fd": fd}


def _names() -> list[Step]:
    n63 = "n63-" + "x" * 59
    utf8 = "séance-✓-名前"
    return [device(), {"op": "device", "again": True},
            create(b"", "empty"), create(b"U" * 64, "unterminated"),
            create(n63, "s63"), create(utf8, "su"),
            create(b"nul-a\0one", "na"), create(b"nul-a\0two", "nb"),
            create(b"\xff\xfe-raw", "raw"),
            get_name("s63"), get_name("su"), get_name("na"),
            get_name("s63", fields={"reserved": 1}),
            retrieve(n63), retrieve(b"U" * 64),
            KEXEC, device(),
            retrieve(n63, "r63"), retrieve(utf8, "ru"), retrieve("nul-a", "rn"),
            retrieve(b"nul-a\0zzz", "rn2"), retrieve(b"\xff\xfe-raw", "rraw"),
            retrieve(b"U" * 64), retrieve(b""),
            get_name("r63"), get_name("ru"), get_name("rn"),
            finish("r63"), finish("ru"), finish("rn")]


def _sizes() -> list[Step]:
    steps = [device(), memfd("m", seed=1)]
    for i, (size, tail) in enumerate([(4, ""), (8, ""), (71, ""), (72, ""),
                                      (80, "00" * 8), (80, "00" * 7 + "01"),
                                      (4096, ""), (4097, "00")]):
        st = create(f"sz-{i}", f"s{i}", size=size)
        if tail:
            st["tail"] = tail
        steps.append(st)
    steps += [preserve("s3", "m", 1, size=8), preserve("s3", "m", 2, size=15),
              preserve("s3", "m", 3, size=24, tail="00" * 8),
              preserve("s3", "m", 4, size=24, tail="00" * 7 + "02"),
              preserve("s3", "m", 5),
              get_name("s3", size=8), get_name("s3", size=72), get_name("s3", size=80),
              get_name("s3", size=88, tail="00" * 8), get_name("s3", size=88, tail="ff" * 8),
              finish("s3"), finish("s3", size=4), finish("s3", size=16, tail="01"),
              KEXEC, device(), retrieve("sz-3", "r"),
              take("r", 5, "f", size=12), take("r", 5, "f2", size=16),
              take("r", 5, "f3", size=24, tail="00" * 8), view("f2"),
              finish("r", size=4), finish("r", size=12, tail="00" * 4),
              finish("r", size=12, tail="00" * 3 + "07"),
              finish("r", fields={"reserved": 1}), finish("r")]
    return steps


def _tokens() -> list[Step]:
    return [device(), create("tok", "s"), create("tok-other", "o"),
            memfd("a", seed=2), memfd("b", seed=3), memfd("c", seed=4),
            preserve("s", "a", 0), preserve("s", "b", U64_MAX), preserve("s", "c", 0),
            preserve("s", "a", 7), preserve("o", "a", 9), preserve("o", "c", 0),
            {"op": "dup", "fd": "a", "as": "adup"}, preserve("o", "adup", 10),
            {"op": "reopen", "fd": "b", "as": "breo"}, preserve("o", "breo", 11),
            view("a"), view("b"),
            KEXEC, device(), retrieve("tok", "r"), retrieve("tok-other", "ro"),
            take("r", 0, "a"), take("r", U64_MAX, "b"), take("r", 1), take("ro", 0, "c"),
            take("r", 0), view("a"), view("b"), view("c"),
            finish("r"), finish("ro")]


def _fd_kinds() -> list[Step]:
    steps: list[Step] = [device(), create("kinds", "s"), create("kinds-2", "s2"),
                         memfd("m", seed=5),
                         memfd("sealless", seed=6, flags=0),
                         memfd("noexec", seed=7, flags=MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL),
                         memfd("exec", seed=8, flags=MFD_ALLOW_SEALING | MFD_EXEC)]
    for kind in ("pipe", "socket", "devnull", "tmpfile"):
        steps.append({"op": "other", "kind": kind, "as": kind})
    tokens = {"m": 1, "sealless": 2, "noexec": 3, "exec": 4, "pipe": 5, "socket": 6,
              "devnull": 7, "tmpfile": 8, "s2": 9, "dev": 10, "closed": 11, -1: 12}
    steps += [preserve("s", fd, tok) for fd, tok in tokens.items()]
    steps += [KEXEC, device(), retrieve("kinds", "r")]
    for name in ("m", "sealless", "noexec", "exec", "tmpfile"):
        steps += [take("r", tokens[name], name), view(name)]
    return [*steps, finish("r")]


def _preserved_memfd() -> list[Step]:
    return [device(), create("frozen", "s"),
            memfd("m", 3 * PAGE + 100, [0, 2], pos=5, seed=9),
            memfd("w", 2 * PAGE, seed=10),
            preserve("s", "m", 1), preserve("s", "w", 2),
            {"op": "write", "fd": "m", "offset": 100, "length": 50, "seed": 11},
            {"op": "write", "fd": "m", "offset": 3 * PAGE + 50, "length": 50, "seed": 11},
            {"op": "write", "fd": "m", "offset": 3 * PAGE + 100, "length": 1, "seed": 11},
            {"op": "seek", "fd": "m", "offset": 777},
            {"op": "truncate", "fd": "m", "size": 3 * PAGE + 100},
            {"op": "truncate", "fd": "m", "size": 8 * PAGE},
            {"op": "truncate", "fd": "m", "size": PAGE},
            {"op": "seal", "fd": "m", "seals": WRITE},
            {"op": "seal", "fd": "m", "seals": FUTURE_WRITE},
            {"op": "seal", "fd": "m", "seals": GROW},
            {"op": "seal", "fd": "w", "seals": SEAL},
            view("m"), view("w"),
            KEXEC, device(), retrieve("frozen", "r"), take("r", 1, "m"), take("r", 2, "w"),
            view("m"), view("w"),
            {"op": "write", "fd": "m", "offset": 0, "length": 10, "seed": 12},
            {"op": "truncate", "fd": "m", "size": 4 * PAGE},
            {"op": "seal", "fd": "m", "seals": GROW}, view("m"),
            {"op": "truncate", "fd": "w", "size": PAGE}, view("w"), finish("r")]


def _shapes() -> list[Step]:
    files = [("holes", 64 * PAGE, [p for p in range(64) if p % 3], 12345, 0),
             ("partial", PAGE + 100, None, 0, SHRINK | GROW | WRITE | SEAL),
             ("empty", 0, [], 0, 0),
             ("big", 2 << 20, [0, 1, 2, 500, 511], 2 << 20, GROW),
             ("exec-seal", PAGE, None, 0, EXEC),
             ("future", 3 * PAGE, [1], PAGE, FUTURE_WRITE)]
    steps: list[Step] = [device(), create("shapes", "s")]
    for i, (name, size, pages, pos, seals) in enumerate(files):
        steps += [memfd(name, size, pages, pos, seals, seed=20 + i), view(name),
                  preserve("s", name, 100 + i)]
    steps += [KEXEC, device(), retrieve("shapes", "r")]
    for i, (name, *_rest) in enumerate(files):
        steps += [take("r", 100 + i, name), view(name)]
    return [*steps, finish("r")]


def _second_stage() -> list[Step]:
    return [device(), create("st2-a", "a"), create("st2-b", "b"), create("st2-c", "c"),
            create("st2-gone", "g"), memfd("m1", seed=30), memfd("m2", seed=31),
            memfd("m3", seed=32), memfd("m4", seed=33),
            preserve("a", "m1", 1), preserve("a", "m2", 2), preserve("b", "m3", 3),
            preserve("g", "m4", 4), close("g"),
            take("a", 1), finish("a"),
            KEXEC, device(), retrieve("st2-a", "a"), retrieve("st2-a"),
            retrieve("st2-gone"), retrieve("st2-none"), create("st2-b"),
            take("a", 1, "x"), take("a", 1), take("a", 99), finish("a"),
            preserve("a", "x", 5), take("a", 2, "y"), view("x"), view("y"),
            finish("a"), finish("a"), retrieve("st2-a"), get_name("a"),
            retrieve("st2-b", "b"), close("b"), retrieve("st2-b", "b2"),
            take("b2", 3, "z"), view("z"), finish("b2"),
            retrieve("st2-c", "c"), finish("c"), create("st2-c", "c2"), get_name("c2"),
            create("st2-new", "n"), preserve("n", "x", 1), preserve("n", "z", 2)]


def generated(seed: int) -> list[Step]:
    """Sessions of memfds of random shapes, some closed again, retrieved in random order."""
    rng = random.Random(seed)
    steps: list[Step] = [device()]
    sessions: dict[str, list[tuple[str, int]]] = {}
    for si in range(rng.randint(1, 3)):
        name = f"gen{seed}-s{si}"
        steps.append(create(name, name))
        files = []
        for fi in range(rng.randint(0, 4)):
            fd = f"{name}-f{fi}"
            pages = rng.randint(0, 80)
            written = sorted(rng.sample(range(pages), rng.randint(0, pages)))
            size = pages * PAGE - rng.choice([0, 0, 1, 100, 4095]) if pages else 0
            steps.append(memfd(fd, max(size, 0), written, rng.randint(0, max(size, 0)),
                               rng.choice([0, 0, GROW, SHRINK | GROW, SEAL | WRITE, EXEC]),
                               seed=seed * 100 + si * 10 + fi))
            token = rng.choice([fi, rng.getrandbits(64), U64_MAX - fi])
            steps += [view(fd), preserve(name, fd, token)]
            if rng.random() < 0.2:
                steps.append(preserve(name, fd, token ^ 1))
            files.append((fd, token))
        sessions[name] = files
        if rng.random() < 0.2:
            steps.append(close(name))
            sessions[name] = []
            steps.append({"op": "note", "closed": name})
    steps += [KEXEC, device()]
    names = list(sessions)
    rng.shuffle(names)
    for name in names:
        steps.append(retrieve(name, name))
        files = list(sessions[name])
        rng.shuffle(files)
        for fd, token in files:
            steps += [take(name, token, fd), view(fd)]
        steps.append(finish(name))
    return [s for s in steps if s["op"] != "note"]


ABOUT = {
    "names": "empty, 63-byte, unterminated, UTF-8 and non-UTF-8 names, names equal up to a "
             "NUL; a second open of the device; GET_NAME before and after",
    "struct-sizes": "size fields short, exact and long, tails zero and non-zero, on every "
                    "ioctl; FINISH's reserved",
    "tokens": "tokens 0 and 2^64-1, a duplicate token, the same memfd in two sessions, a "
              "dup and a /proc/self/fd reopen of a preserved memfd",
    "fd-kinds": "memfds (sealable or not, MFD_NOEXEC_SEAL, MFD_EXEC), a pipe, a socket, "
                "/dev/null, an unlinked tmpfs file, a session, the device, a closed fd, -1",
    "preserved-memfd": "writes, seeks, size changes and seals on a preserved memfd, and on "
                       "the retrieved one",
    "shapes": "holes, a partial last page, an empty file, 2 MiB, position at the end, "
              "F_SEAL_EXEC on a 0777 memfd, F_SEAL_FUTURE_WRITE",
    "second-stage": "retrieve twice, unknown names and tokens, FINISH early and twice, a "
                    "closed incoming session, new sessions with incoming names",
    "seed": "generated from a fixed seed: sessions of random memfds, some closed, "
            "retrieved in random order",
}


def batch() -> dict[str, list[Step]]:
    """Every scenario, by id, in the order they run."""
    out = {"names": _names(), "struct-sizes": _sizes(), "tokens": _tokens(),
           "fd-kinds": _fd_kinds(), "preserved-memfd": _preserved_memfd(),
           "shapes": _shapes(), "second-stage": _second_stage()}
    for seed in SEEDS:
        out[f"seed-{seed}"] = generated(seed)
    return out
