"""``luoctl image``: kernel images on an emulated machine's disk."""

from __future__ import annotations

import json
import os

import click

from liveupdate.abi import image as image_abi
from liveupdate.cli.common import SizeParam, emit, fail
from liveupdate.errors import LiveUpdateError

DEFAULT_RELEASE = {"v3": "6.17.0-lu-v3", "6.19": "6.19.0-lu", "7.1": "7.1.0-lu"}
CORE_RELEASE = {"6.16": "6.16.0-lu", "6.18": "6.18.0-lu", "6.19": "6.19.0-lu", "7.1": "7.1.0-lu"}


@click.group()
def image() -> None:
    """Kernel images: what kexec_file_load loads and the firmware boots."""


@image.command()
@click.argument("name")
@click.option("--dir", "folder", envvar="LIVEUPDATE_MACHINE", default=".machine",
              show_default=True, help="The machine's folder; the image goes to disk/images/.")
@click.option("--release", default=None,
              help="What uname -r reports [default: 6.17.0-lu-v3, 6.19.0-lu or 7.1.0-lu by "
                   "--luo, 6.16.0-lu or 6.18.0-lu by --kho-core without LUO; userspace tells "
                   "the uAPI generation from it].")
@click.option("--load-size", type=SizeParam(), default="32M", show_default=True,
              help="Memory the loaded image occupies (counts toward scratch sizing).")
@click.option("--kho-bitmap-bytes", type=click.Choice(["4096", "512"]), default=None,
              help="kho-v1 bitmap size: 4096 (6.18+) or 512 (6.16/6.17; implies --kho-core "
                   "6.16) [default: 512 on the 6.16 core, else 4096].")
@click.option("--kho-core", type=click.Choice(image_abi.KHO_CORES), default=None,
              help="Linux release whose KHO core the kernel follows: when the memory map is "
                   "finalized and what debugfs shows [default: 7.1 for --luo 7.1, else 6.19; "
                   "6.16 and 6.18 need --luo none].")
@click.option("--luo", type=click.Choice(image_abi.LUO_GENERATIONS), default=None,
              help="LUO uAPI generation the kernel speaks; none before 6.19 [default: 6.19, "
                   "or none with --kho-core 6.16/6.18].")
@click.option("--memfd", type=click.Choice(image_abi.MEMFD_FORMATS), default="memfd-v1",
              show_default=True, help="memfd handover format.")
@click.option("--force", is_flag=True, help="Overwrite an existing image.")
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON.")
def create(name: str, folder: str, release: str | None, load_size: int,
           kho_bitmap_bytes: str | None, kho_core: str | None, luo: str | None, memfd: str,
           force: bool, as_json: bool) -> None:
    """Write disk/images/NAME.img: a kernel image header naming the kernel's code, release,
    KHO core, handover formats and load size. Load it with `luoctl machine kexec load
    images/NAME.img` or boot it with `luoctl machine start --image images/NAME.img`."""
    if kho_core is None and kho_bitmap_bytes == "512":
        kho_core = "6.16"  # 512-byte bitmaps: 6.16, or 6.17 without the stable fix
    if luo is None:
        luo = "none" if kho_core in ("6.16", "6.18") else "6.19"
    release = release or (CORE_RELEASE[kho_core or "6.19"] if luo == "none"
                          else DEFAULT_RELEASE[luo])
    bitmap = int(kho_bitmap_bytes or (512 if kho_core == "6.16" else 4096))
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        fail(f"image name {name!r} must be letters, digits, '-', '_' or '.'")
    img = image_abi.KernelImage(release=release, load_size=load_size, kho_bitmap_bytes=bitmap,
                                luo=luo, memfd=memfd, kho_core=kho_core or "")
    path = os.path.join(folder, "disk", "images", f"{name}.img")
    try:
        raw = img.encode()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if force else "xb") as f:
            f.write(raw)
    except FileExistsError:
        fail(f"{path} exists (use --force to overwrite)")
    except (LiveUpdateError, OSError) as e:
        fail(e)
    header = json.loads(raw[image_abi.PREAMBLE.size :])
    emit({"path": path, **header}, as_json, f"wrote {path}: {release}, KHO {img.kho}/"
         f"{img.kho_bitmap_bytes} on the {img.kho_core} core, LUO {luo}, {memfd}, load size "
         f"{load_size >> 20} MiB")
