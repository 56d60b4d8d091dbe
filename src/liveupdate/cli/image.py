"""``luoctl image``: kernel images on an emulated machine's disk."""

from __future__ import annotations

import json
import os

import click

from liveupdate.abi import image as image_abi
from liveupdate.cli.common import SizeParam, emit, fail
from liveupdate.errors import LiveUpdateError

DEFAULT_RELEASE = {"v3": "6.17.0-lu-v3", "6.19": "6.19.0-lu", "7.1": "7.1.0-lu"}


@click.group()
def image() -> None:
    """Kernel images: what kexec_file_load loads and the firmware boots."""


@image.command()
@click.argument("name")
@click.option("--dir", "folder", envvar="LIVEUPDATE_MACHINE", default=".machine",
              show_default=True, help="The machine's folder; the image goes to disk/images/.")
@click.option("--release", default=None,
              help="What uname -r reports [default: 6.17.0-lu-v3, 6.19.0-lu or 7.1.0-lu by "
                   "--luo; userspace tells the uAPI generation from it].")
@click.option("--load-size", type=SizeParam(), default="32M", show_default=True,
              help="Memory the loaded image occupies (counts toward scratch sizing).")
@click.option("--kho-bitmap-bytes", type=click.Choice(["4096", "512"]), default="4096",
              show_default=True, help="kho-v1 bitmap size: 4096 (6.18+) or 512 (6.16/6.17).")
@click.option("--luo", type=click.Choice(image_abi.LUO_GENERATIONS), default="6.19",
              show_default=True, help="LUO uAPI generation the kernel speaks.")
@click.option("--memfd", type=click.Choice(image_abi.MEMFD_FORMATS), default="memfd-v1",
              show_default=True, help="memfd handover format.")
@click.option("--force", is_flag=True, help="Overwrite an existing image.")
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON.")
def create(name: str, folder: str, release: str | None, load_size: int, kho_bitmap_bytes: str,
           luo: str, memfd: str, force: bool, as_json: bool) -> None:
    """Write disk/images/NAME.img: a kernel image header naming the kernel's code, release,
    handover formats and load size. Load it with `luoctl machine kexec load images/NAME.img`
    or boot it with `luoctl machine start --image images/NAME.img`."""
    release = release or DEFAULT_RELEASE[luo]
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        fail(f"image name {name!r} must be letters, digits, '-', '_' or '.'")
    img = image_abi.KernelImage(release=release, load_size=load_size,
                                kho_bitmap_bytes=int(kho_bitmap_bytes), luo=luo, memfd=memfd)
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
         f"{img.kho_bitmap_bytes}, LUO {luo}, {memfd}, load size {load_size >> 20} MiB")
