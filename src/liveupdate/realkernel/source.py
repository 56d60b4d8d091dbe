"""Linux 7.3's source from Debian, through a private apt configuration.

The host's apt knows only its own suite; ``linux-source-7.3`` lives in trixie-backports (and
release candidates in experimental). We never touch the system's sources: apt runs with its
own sources list, lists and cache under the harness cache (``Dir::Etc::SourceList``,
``Dir::Etc::SourceParts=/dev/null``, ``Dir::State::Lists``, ``Dir::Cache``), signed by the
Debian archive keyring the host already has. The newest ``7.3.x`` offered by any of those
suites is taken -- a pinned Debian revision disappears when it is superseded -- and recorded
in the build's manifest. ``apt-get download``, ``dpkg-deb -x``, untar.

Debian's binary kernels have ``CONFIG_KEXEC_HANDOVER`` off, hence a source build.
"""

from __future__ import annotations

import errno
import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.host import run, say, step

PACKAGE = "linux-source-7.3"
MIRROR = "http://deb.debian.org/debian"
SUITES = ("trixie-backports", "experimental")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@dataclass(frozen=True)
class Source:
    """An unpacked kernel tree and where it came from."""

    tree: Path
    debian_version: str  # e.g. 7.3.4-1~bpo13+1

    @property
    def kernel_version(self) -> str:
        """VERSION.PATCHLEVEL.SUBLEVEL from the tree's own Makefile."""
        text = (self.tree / "Makefile").read_text(errors="replace")
        parts = [re.search(rf"^{k} = (\S*)", text, re.M) for k in
                 ("VERSION", "PATCHLEVEL", "SUBLEVEL")]
        return ".".join(m.group(1) if m else "?" for m in parts)


class Apt:
    """apt-get/apt-cache with a configuration of their own under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources = root / "sources.list"
        self.lists = root / "lists"
        self.cache = root / "cache"

    def opts(self) -> list[str]:
        return ["-o", f"Dir::Etc::SourceList={self.sources}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={self.lists}",
                "-o", f"Dir::Cache={self.cache}",
                "-o", "Debug::NoLocking=1"]

    def update(self) -> None:
        if not KEYRING.exists():
            raise LiveUpdateError(err=errno.ENOENT, msg=f"{KEYRING} is missing: install "
                                  "debian-archive-keyring")
        for d in (self.lists / "partial", self.cache / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        self.sources.write_text("".join(f"deb [signed-by={KEYRING}] {MIRROR} {s} main\n"
                                        for s in SUITES))
        run(["apt-get", *self.opts(), "update"], log=self.root / "apt.log",
            what="apt-get update (private configuration)")

    def versions(self, package: str) -> list[str]:
        out = subprocess.run(["apt-cache", *self.opts(), "madison", package],
                             capture_output=True, text=True, check=False).stdout
        return [line.split("|")[1].strip() for line in out.splitlines() if "|" in line]

    def download(self, package: str, version: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        run(["apt-get", *self.opts(), "download", f"{package}={version}"], cwd=into,
            log=self.root / "apt.log", what=f"apt-get download {package}={version}")
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"apt-get download left no "
                                  f"{package} .deb in {into}")
        return debs[-1]


def compare(a: str, b: str) -> int:
    if a == b:
        return 0
    gt = subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode
    return 1 if gt == 0 else -1


def newest(versions: list[str]) -> str:
    """The newest Debian version of a 7.3.x release (``dpkg --compare-versions``)."""
    if not versions:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"no suite of {', '.join(SUITES)} "
                              f"offers {PACKAGE}")
    return max(versions, key=functools.cmp_to_key(compare))


# a Debian version: epoch-less upstream version and revision (policy 5.6.12); nothing that
# could name a folder outside the cache ("..", "/")
VERSION = re.compile(r"[0-9][A-Za-z0-9.+~]*(-[A-Za-z0-9.+~]+)?")


def check_version(version: str) -> str:
    if not VERSION.fullmatch(version) or ".." in version:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"{version!r} is not a Debian version "
                              "such as 7.3.4-1~bpo13+1")
    return version


def upstream(version: str) -> str:
    """The kernel version a Debian version packages: ``7.3.4-1~bpo13+1`` -> ``7.3.4``."""
    return check_version(version).split("-", 1)[0]


def resolve(cache: Path, version: str | None = None) -> str:
    """``version`` checked, or the newest ``linux-source-7.3`` Debian offers; offline, the
    newest already unpacked in the cache."""
    if version is not None:
        return check_version(version)
    try:
        with step(f"asking Debian for the newest {PACKAGE}"):
            apt = Apt(cache / "apt")
            apt.update()
            return check_version(newest(apt.versions(PACKAGE)))
    except LiveUpdateError:
        have = [m.read_text().strip() for m in (cache / "src").glob("*/.unpacked")]
        if not have:
            raise
        version = newest(have)
        say(f"apt unreachable; using the unpacked {PACKAGE} {version}")
        return version


def fetch(cache: Path, version: str) -> Source:
    """The unpacked tree of ``version``, reusing an earlier download."""
    tree_dir = cache / "src" / check_version(version)
    tree = tree_dir / "linux-source-7.3"
    if (tree_dir / ".unpacked").exists():
        return Source(tree, version)
    with step(f"fetching {PACKAGE} {version}"):
        if tree_dir.exists():
            shutil.rmtree(tree_dir)
        deb = Apt(cache / "apt").download(PACKAGE, version, tree_dir / "deb")
        run(["dpkg-deb", "-x", str(deb), str(tree_dir / "deb")], log=tree_dir / "unpack.log",
            what="dpkg-deb -x")
        tarballs = list((tree_dir / "deb").glob("usr/src/linux-source-*.tar.*"))
        if not tarballs:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"{deb.name} holds no source tarball")
        run(["tar", "xf", str(tarballs[0]), "-C", str(tree_dir)],
            log=tree_dir / "unpack.log", what=f"untar {tarballs[0].name}")
        shutil.rmtree(tree_dir / "deb")
    if not (tree / "Makefile").exists():
        raise LiveUpdateError(err=errno.ENOENT, msg=f"{tree} has no Makefile after unpacking")
    (tree_dir / ".unpacked").write_text(version + "\n")
    return Source(tree, version)
