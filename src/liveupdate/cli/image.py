"""``luoctl image``: kernel images on an emulated machine's disk."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from liveupdate.abi import generations
from liveupdate.abi import image as image_abi
from liveupdate.cli.common import SizeParam, emit, fail
from liveupdate.errors import LiveUpdateError

DEFAULT_CORE = "6.19"  # the KHO core of an image that names neither a core nor a bitmap width


def _reads(value: str | None) -> dict[str, list[str]]:
    """``kho=kho-v1,kho-v4;memfd=memfd-v1`` -> a manifest (checked by the image)."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (value or "").split(";")):
        comp, eq, fmts = part.partition("=")
        if not eq:
            fail(f"--reads {part!r}: want COMPONENT=FORMAT[,FORMAT...]")
        out[comp.strip()] = [f.strip() for f in fmts.split(",") if f.strip()]
    return out


@click.group()
def image() -> None:
    """Kernel images: what kexec_file_load loads and the firmware boots."""


@image.command()
@click.argument("name")
@click.option("--dir", "folder", envvar="LIVEUPDATE_MACHINE", default=".machine",
              show_default=True, help="The machine's folder; the image goes to disk/images/.")
@click.option("--generation", type=click.Choice(list(generations.RELEASES)), default=None,
              help="A whole kernel generation: 6.16, 6.18 (no LUO), v3, 6.19, 7.0, 7.1, 7.2 "
                   "-- its KHO core and format, LUO and memfd formats and release "
                   "(docs/generations.md). The options below override single fields.")
@click.option("--release", default=None,
              help="What uname -r reports [default: the generation's, e.g. 7.2.0-lu; "
                   "userspace tells the uAPI generation from it].")
@click.option("--load-size", type=SizeParam(), default="32M", show_default=True,
              help="Memory the loaded image occupies (counts toward scratch sizing).")
@click.option("--kho-bitmap-bytes", type=click.Choice(["4096", "512"]), default=None,
              help="kho-v1 bitmap size: 4096 (6.18+) or 512 (6.16/6.17; implies --kho-core "
                   "6.16) [default: 512 on the 6.16 core, else 4096].")
@click.option("--kho-core", type=click.Choice(list(generations.KHO_CORES)), default=None,
              help="Linux release whose KHO core the kernel follows: when the memory map is "
                   "finalized and what debugfs shows [default: the LUO generation's].")
@click.option("--luo", type=click.Choice(image_abi.LUO_GENERATIONS), default=None,
              help="LUO generation (uAPI and handover formats); none before 6.19 [default: "
                   "6.19, or none with --kho-core 6.16/6.18].")
@click.option("--reads", default=None, metavar="MANIFEST",
              help="What the image claims to read, for negotiation (liveupdate_negotiate=on):"
                   " 'kho=kho-v1,kho-v4;memfd=memfd-v1'. Default: what its code reads. A "
                   "claim the code cannot back is a lie the next kernel's validation catches "
                   "(cold boot, panic or EIO) -- useful to test exactly that.")
@click.option("--force", is_flag=True, help="Overwrite an existing image.")
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON.")
def create(name: str, folder: str, generation: str | None, release: str | None,
           load_size: int, kho_bitmap_bytes: str | None, kho_core: str | None,
           luo: str | None, reads: str | None, force: bool, as_json: bool) -> None:
    """Write disk/images/NAME.img: a kernel image header naming the kernel's code, release,
    KHO core, handover formats, manifest and load size. Load it with `luoctl machine kexec
    load images/NAME.img` or boot it with `luoctl machine start --image images/NAME.img`."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        fail(f"image name {name!r} must be letters, digits, '-', '_' or '.'")
    fields: dict[str, Any] = {"load_size": load_size, "reads": _reads(reads)}
    if generation is None:
        if kho_core is None and kho_bitmap_bytes:  # 512-byte bitmaps: the 6.16 core
            kho_core = generations.DEFAULT_CORE.get(("kho-v1", int(kho_bitmap_bytes)))
        core = generations.KHO_CORES[kho_core or DEFAULT_CORE]
        luo = luo or core.luo
        row = generations.RELEASES.get(luo)
        fields.update(luo=luo, kho_core=kho_core or "",
                      release=row.release if row else core.release,
                      kho_bitmap_bytes=int(kho_bitmap_bytes or core.bitmaps[0]))
    else:
        over = {"kho_core": kho_core, "luo": luo, "kho_bitmap_bytes":
                int(kho_bitmap_bytes) if kho_bitmap_bytes else None}
        fields.update({k: v for k, v in over.items() if v is not None})
    if release:
        fields["release"] = release
    try:
        img = image_abi.KernelImage.of(generation, **fields) if generation else \
            image_abi.KernelImage(**fields)
    except LiveUpdateError as e:
        fail(e)
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
    emit({"path": path, **header, "generation": img.generation}, as_json,
         f"wrote {path}: {img.release} (generation {img.generation}), KHO {img.kho}/"
         f"{img.kho_bitmap_bytes} on the {img.kho_core} core, LUO {img.luo}"
         + (f", {img.memfd}" if img.memfd else "") + f", load size {load_size >> 20} MiB")
