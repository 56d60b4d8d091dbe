"""Build Linux 7.3 with KHO + LUO, and upstream's liveupdate selftests, cached.

The configuration is upstream's recipe for a minimal bootable kernel: ``make tinyconfig``,
then ``kconfig.fragment`` (kept beside this file) merged with
``scripts/kconfig/merge_config.sh -m`` and ``make olddefconfig``. As
``tools/testing/selftests/liveupdate/vmtest.sh`` does, every option the fragment asks for
must be in the final ``.config``; one that Kconfig dropped (an unmet ``depends on``) is an
error naming it, not a kernel that boots without it.

The selftests are built from the same tree against its own exported headers
(``make headers``; ``KHDR_INCLUDES``), dynamically linked: the guest runs on the host's root
filesystem, so the host's libc is there.

An image is cached under ``<cache>/images/<key>``, ``key`` = kernel version, Debian
revision and the fragment's sha256, with a ``manifest.json`` saying what was built, from what
and how long each step took; the object tree stays under ``<cache>/build/<key>`` so an
interrupted build resumes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel import source as source_mod
from liveupdate.realkernel.host import cache_lock, cache_root, ensure_tools, run, say, step

FRAGMENT = Path(__file__).with_name("kconfig.fragment")
SELFTESTS = ("liveupdate", "luo_kexec_simple", "luo_multi_session", "luo_stress_sessions",
             "luo_stress_files")


@dataclass(frozen=True)
class Image:
    """A built kernel and its selftests."""

    root: Path
    manifest: dict[str, Any]

    @property
    def bzimage(self) -> Path:
        return self.root / "bzImage"

    @property
    def selftests(self) -> Path:
        return self.root / "selftests"

    @property
    def release(self) -> str:
        return str(self.manifest["kernel_release"])


def fragment_options(text: str) -> dict[str, str]:
    """``CONFIG_X`` -> ``y``/``n``/value, from ``CONFIG_X=v`` and ``# CONFIG_X is not set``."""
    opts: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        n = re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip())
        if m:
            opts[m.group(1)] = m.group(2)
        elif n:
            opts[n.group(1)] = "n"
    return opts


def unmet(fragment: str, config: str) -> list[str]:
    """Options of the fragment the final ``.config`` does not have as asked."""
    have = fragment_options(config)
    return [f"{k}={v}" for k, v in fragment_options(fragment).items()
            if have.get(k, "n") != v]


def fragment_sha256(fragment: str) -> str:
    return hashlib.sha256(fragment.encode()).hexdigest()


def key(kernel_version: str, debian_version: str, fragment: str) -> str:
    digest = fragment_sha256(fragment)[:12]
    return f"{kernel_version}-{re.sub(r'[^A-Za-z0-9.+-]', '_', debian_version)}-{digest}"


def load(img_dir: Path) -> Image | None:
    """The image in ``img_dir`` if it is complete; a manifest that does not parse is an
    image that must be built again."""
    try:
        manifest = json.loads((img_dir / "manifest.json").read_text())
        img = Image(img_dir, manifest)
        if img.bzimage.exists() and isinstance(manifest.get("kernel_release"), str):
            return img
    except (OSError, ValueError):
        pass
    return None


def cached(cache: Path) -> list[Image]:
    """Every complete image in the cache built from the current fragment, the newest Debian
    version first."""
    digest = fragment_sha256(FRAGMENT.read_text())[:12]
    imgs = [img for d in cache.glob(f"images/*-{digest}") if (img := load(d)) is not None]
    by_version = functools.cmp_to_key(source_mod.compare)
    return sorted(imgs, key=lambda i: by_version(str(i.manifest.get("debian_version"))),
                  reverse=True)


def build(cache: Path | None = None, *, jobs: int | None = None,
          version: str | None = None) -> Image:
    """The image for the newest ``linux-source-7.3`` (or ``version``) and the current
    fragment: from the cache when there, else fetched and built. Offline, the newest cached
    image of this fragment is used."""
    cache = cache or cache_root()
    with cache_lock(cache):
        return _build(cache, jobs, version)


def _build(cache: Path, jobs: int | None, version: str | None) -> Image:
    try:
        version = source_mod.resolve(cache, version)
    except LiveUpdateError:
        have = cached(cache)
        if version is None and have:
            say(f"Debian unreachable; using the cached {have[0].root.name}")
            return have[0]
        raise
    fragment = FRAGMENT.read_text()
    img_dir = cache / "images" / key(source_mod.upstream(version), version, fragment)
    img = load(img_dir)
    if img is not None:
        say(f"cached image {img_dir} (Linux {img.release})")
        return img
    ensure_tools()
    src = source_mod.fetch(cache, version)
    bdir = cache / "build" / img_dir.name
    bdir.mkdir(parents=True, exist_ok=True)
    log = bdir / "build.log"
    log.write_text("")
    jobs = jobs or os.cpu_count() or 1
    make = ["make", "-C", str(src.tree), f"O={bdir}"]
    times: dict[str, float] = {}
    with step("configuring (tinyconfig + kconfig.fragment)", times, "configure"):
        (bdir / "fragment.config").write_text(fragment)
        run([*make, "tinyconfig"], log=log, what="make tinyconfig")
        run([str(src.tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(bdir),
             str(bdir / ".config"), str(bdir / "fragment.config")], log=log,
            what="merge_config.sh", cwd=src.tree)
        run([*make, "olddefconfig"], log=log, what="make olddefconfig")
        bad = unmet(fragment, (bdir / ".config").read_text())
        if bad:
            raise LiveUpdateError(err=errno.EINVAL, msg="Kconfig dropped options the "
                                  f"fragment needs: {', '.join(bad)}")
    with step(f"building bzImage with make -j{jobs} (6-10 minutes on 2 cores)", times,
              "bzImage"), \
            _progress(log):
        run([*make, f"-j{jobs}", "bzImage"], log=log, what="make bzImage")
    with step("building upstream's liveupdate selftests", times, "selftests"):
        run([*make, "headers"], log=log, what="make headers")
        out = bdir / "selftests"
        run(["make", "-C", str(src.tree / "tools/testing/selftests/liveupdate"),
             f"OUTPUT={out}", f"KHDR_INCLUDES=-isystem {bdir}/usr/include"],
            log=log, what="make selftests/liveupdate")
    release_file = bdir / "include/config/kernel.release"
    if not release_file.exists():
        raise LiveUpdateError(err=errno.ENOENT, msg=f"the build left no {release_file}")
    release = release_file.read_text().strip()
    staging = img_dir.with_name(img_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "selftests").mkdir(parents=True)
    shutil.copy2(bdir / "arch/x86/boot/bzImage", staging / "bzImage")
    shutil.copy2(bdir / ".config", staging / "config")
    for name in SELFTESTS:
        shutil.copy2(bdir / "selftests" / name, staging / "selftests" / name)
    manifest = {"package": source_mod.PACKAGE, "debian_version": src.debian_version,
                "kernel_version": src.kernel_version, "kernel_release": release,
                "fragment_sha256": fragment_sha256(fragment),
                "bzimage_bytes": (staging / "bzImage").stat().st_size, "jobs": jobs,
                "build_seconds": times, "built_at": time.time(),
                "selftests": list(SELFTESTS)}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(img_dir, ignore_errors=True)
    staging.rename(img_dir)
    return Image(img_dir, manifest)


class _progress:
    """Every 30 s, how many objects the build has compiled so far: make's output goes to the
    log, and a harness silent for minutes looks hung."""

    def __init__(self, log: Path) -> None:
        self.log, self.stop = log, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(30):
            try:
                n = sum(1 for line in self.log.read_text(errors="replace").splitlines()
                        if line.lstrip().startswith("CC "))
            except OSError:
                continue
            say(f"  ... {n} objects compiled, {time.monotonic() - t0:.0f} s")
