"""The one table of handover formats, and the compatibility matrix it encodes."""

import pytest

from liveupdate.abi import formats, generations, image
from liveupdate.errors import AbiError
from liveupdate.tools import report
from tests.abi.fuzz_runner import DECODERS, SEEDS


def test_every_format_has_a_describer_a_seed_and_a_fuzzer() -> None:
    names = {f.name for f in formats.FORMATS}
    assert set(report.DESCRIBERS) == names
    assert names <= set(SEEDS)
    assert {f"format.{n}" for n in names} <= set(DECODERS)


def test_seeds_decode_with_the_tables_decoder() -> None:
    for f in formats.FORMATS:
        f.decode(SEEDS[f.name])


def _native(gen: str) -> dict[str, tuple[str, ...]]:
    return {c: (f,) for c, f in image.KernelImage.of(gen).native().items()}


def test_a_device_file_is_eio_where_the_reader_lacks_its_handler() -> None:
    """7.3 plus the posted series hands a VFIO device over; plain 7.3 has no vfio-pci-v1
    handler (luo_file_deserialize: EIO) but takes the memfd-only handover of the same kernel."""
    written = image.KernelImage.of("7.3+posted").native()
    assert written["vfio"] == "vfio-pci-v1" and written["iommufd"] == "iommufd-v1"
    got = formats.incompatibilities(written, _native("7.3"))
    assert [(i.component, i.effect) for i in got] == [
        ("vfio", "EIO"), ("iommufd", "EIO"), ("huge-memfd", "EIO")]
    memfd_only = {c: f for c, f in written.items()
                  if c not in generations.FILE_COMPONENTS or c == "memfd"}
    assert formats.incompatibilities(memfd_only, _native("7.3")) == []
    assert formats.incompatibilities(written, _native("7.3+posted")) == []


@pytest.mark.parametrize("writer, reader, want", [
    ("6.19", "6.19", []),
    ("7.2", "7.2", []),
    ("v3", "v3", []),
    ("7.0", "6.19", []),  # 6.19 ignores the luo-flb node
    ("6.19", "7.0", [("flb", "luo-flb-v1", "requires", "panic")]),
    ("6.19", "7.1", [("kho", "kho-v1", "cannot read", "cold boot")]),
    ("7.1", "7.2", [("kho", "kho-v3", "cannot read", "cold boot")]),
    ("6.18", "6.16", [("kho", "kho-v1", "cannot read", "cold boot")]),
    ("6.16", "6.18", [("kho", "kho-v1-512", "cannot read", "cold boot")]),
    ("v3", "6.19", [("luo", "luo-v3", "cannot read", "panic")]),
    ("6.19", "v3", [("luo", "luo-v1", "cannot read", "panic")]),
    ("6.19", "6.18", [("luo", "luo-v1", "has no LUO", "unreachable")]),
])
def test_linux_between_generations(writer: str, reader: str,
                                   want: list[tuple[str, str, str, str]]) -> None:
    """spec/kho.md 8 and spec/luo.md 7, cell by cell, for a handover holding a memfd."""
    written = image.KernelImage.of(writer).native()
    got = [(i.component, i.format, i.reason, i.effect)
           for i in formats.incompatibilities(written, _native(reader))]
    assert got == want


def test_7_1_memfd_is_eio_on_an_otherwise_readable_handover() -> None:
    written = {"kho": "kho-v1", "luo": "luo-v1", "flb": "luo-flb-v1", "memfd": "memfd-v2"}
    reads = {"kho": ("kho-v1",), "luo": ("luo-v1",), "flb": ("luo-flb-v1",),
             "memfd": ("memfd-v1",)}
    got = formats.incompatibilities(written, reads)
    assert [(i.component, i.effect) for i in got] == [("memfd", "EIO")]
    del written["memfd"]  # no file preserved: nothing the handler would refuse
    assert formats.incompatibilities(written, reads) == []


@pytest.mark.parametrize("writer, reader, want", [
    ("7.2", "6.19", {"kho": "kho-v1", "luo": "luo-v1", "flb": "none", "memfd": "memfd-v1"}),
    ("6.19", "7.2", {"kho": "kho-v1", "luo": "luo-v1", "flb": "none", "memfd": "memfd-v1"}),
    ("7.2", "7.1", {"kho": "kho-v3", "luo": "luo-v1", "flb": "luo-flb-v1",
                    "memfd": "memfd-v2"}),
    ("7.2", "7.2", {"kho": "kho-v4", "luo": "luo-v5", "flb": "luo-flb-v1",
                    "memfd": "memfd-v2"}),
    ("7.2", "6.16", {"kho": "kho-v1-512"}),
    ("6.16", "7.2", {"kho": "kho-v1-512"}),
])
def test_negotiation_picks_the_newest_common_format(writer: str, reader: str,
                                                    want: dict[str, str]) -> None:
    w, r = image.KernelImage.of(writer), image.KernelImage.of(reader)
    assert generations.agree(w.native(), w.capable(), r.manifest()) == want


def test_negotiation_refuses_families_with_nothing_in_common() -> None:
    w, r = image.KernelImage.of("v3"), image.KernelImage.of("7.2")
    with pytest.raises(AbiError, match="reads luo-v1/luo-v5 luo format, this one writes "
                                       "luo-v3"):
        generations.agree(w.native(), w.capable(), r.manifest())


def test_images_of_every_generation() -> None:
    for gen in generations.RELEASES:
        img = image.decode(image.KernelImage.of(gen).encode())
        assert img.generation == gen
    assert image.KernelImage(luo="7.2").kho == "kho-v4"
    with pytest.raises(AbiError, match="unknown kernel generation"):
        image.KernelImage.of("5.10")
    with pytest.raises(AbiError, match="unsupported"):
        image.KernelImage(luo="5.10").encode()
    with pytest.raises(AbiError, match="needs the KHO format kho-v4"):
        image.KernelImage(luo="7.2", kho="kho-v1").encode()
    with pytest.raises(AbiError, match="unknown formats"):
        image.KernelImage(reads={"kho": ["kho-v9"]}).encode()
    lying = image.KernelImage.of("6.19", reads={"kho": ["kho-v1", "kho-v4"]})
    assert image.decode(lying.encode()).manifest()["kho"] == ("kho-v1", "kho-v4")


def test_every_format_belongs_to_a_component_format_of_the_generations_table() -> None:
    """The two tables name the same formats: a decoder's (component, fmt) is a format some
    generation writes natively."""
    written = {(c, f) for g in generations.RELEASES
               for c, f in image.KernelImage.of(g).native().items()}
    for f in formats.FORMATS:
        if f.component and f.fmt:
            assert (f.component, f.fmt) in written, f.name
