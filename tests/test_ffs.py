"""The FFS partition table writer/reader against skiboot's libflash/ffs.h."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiomapbridge.sim import ffs

BLOCK = 4096


def words_xor(data: bytes) -> int:
    """skiboot's check, done on native (little-endian here) words."""
    out = 0
    for (w,) in struct.iter_unpack("<I", data):
        out ^= w
    return out


@pytest.fixture
def image() -> bytes:
    parts = ffs.default_partitions()
    return ffs.build_image(parts, flash_size=1 << 20, block_size=BLOCK)


def test_header_layout_matches_ffs_h(image: bytes) -> None:
    # struct __ffs_hdr: 11 be32 fields then the checksum: 48 bytes
    fields = struct.unpack(">12I", image[:48])
    magic, version, size, entry_size, count, block_size, block_count = fields[:7]
    assert image[:4] == b"PART" and magic == 0x50415254
    assert version == 1
    assert size == 1  # the table is one 4 KiB block
    assert entry_size == 128 and count == 3
    assert block_size == BLOCK and block_count == (1 << 20) // BLOCK
    assert fields[7:11] == (0, 0, 0, 0)
    # the checksum makes the XOR of all 12 words zero, in either byte order
    assert words_xor(image[:48]) == 0
    assert ffs.xor_checksum(image[:48]) == 0
    assert fields[11] == ffs.xor_checksum(image[:44])


def test_entry_layout_matches_ffs_h(image: bytes) -> None:
    names = []
    for i in range(3):
        raw = image[48 + 128 * i : 48 + 128 * (i + 1)]
        assert words_xor(raw) == 0, f"entry {i} checksum"
        name = raw[:16]
        base, size, pid, ident, ptype, flags, actual = struct.unpack(">7I", raw[16:44])
        assert raw[44:60] == bytes(16)  # resvd[4]
        # user: chip, compresstype, be16 datainteg, vercheck, miscflags, ...
        assert raw[60:124] == bytes(64)  # no ECC, no flags
        assert pid == 0xFFFFFFFF and ident == i + 1 and flags == 0
        assert actual == size * BLOCK
        names.append((name.rstrip(b"\0"), base, size, ptype))
    assert names == [
        (b"part", 0, 1, 3),
        (b"VERSION", 1, 1, 1),
        (b"NVRAM", 2, ffs.DEFAULT_NVRAM_SIZE // BLOCK, 1),
    ]


def test_partition_contents(image: bytes) -> None:
    table = ffs.read_table(image)
    version = table.find("VERSION")
    nvram = table.find("NVRAM")
    assert version is not None and nvram is not None
    text = image[version.offset : version.offset + version.size]
    assert text.startswith(ffs.DEFAULT_VERSION_TEXT.encode())
    assert text.rstrip(b"\0") == ffs.DEFAULT_VERSION_TEXT.encode()
    # a blank NVRAM (erased), big enough for skiboot to format it
    assert nvram.size >= ffs.NVRAM_MIN_SIZE
    assert image[nvram.offset : nvram.offset + nvram.size] == b"\xff" * nvram.size
    # the rest of the flash is erased too
    assert set(image[nvram.offset + nvram.size :]) == {0xFF}


def test_make_pnor_writes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pnor.img"
    table = ffs.make_pnor(path, 2 << 20)
    assert path.stat().st_size == 2 << 20
    assert ffs.read_table(path.read_bytes()) == table
    assert table.flash_size == 2 << 20
    assert [e.name for e in table.entries] == ["part", "VERSION", "NVRAM"]


@pytest.mark.parametrize("offset", [0, 4, 20, 44, 48 + 16, 48 + 124, 48 + 128 + 40])
def test_reader_detects_corruption(image: bytes, offset: int) -> None:
    bad = bytearray(image)
    bad[offset] ^= 0x01
    with pytest.raises(ffs.FfsError):
        ffs.read_table(bytes(bad))


def test_reader_rejects_blank_flash() -> None:
    with pytest.raises(ffs.FfsError, match="magic"):
        ffs.read_table(b"\xff" * 4096)


@pytest.mark.parametrize(
    "parts",
    [
        [ffs.Partition("part", 0, BLOCK), ffs.Partition("A", BLOCK // 2, BLOCK)],
        [ffs.Partition("part", 0, BLOCK), ffs.Partition("A", 0, BLOCK)],
        [ffs.Partition("part", 0, BLOCK), ffs.Partition("part", BLOCK, BLOCK)],
        [ffs.Partition("part", 0, BLOCK), ffs.Partition("X" * 16, BLOCK, BLOCK)],
        [ffs.Partition("part", 0, BLOCK), ffs.Partition("A", BLOCK, 1 << 20)],
        [ffs.Partition("A", BLOCK, BLOCK)],
    ],
)
def test_bad_layouts_are_refused(parts: list[ffs.Partition]) -> None:
    with pytest.raises(ValueError):
        ffs.build_table(parts, flash_size=1 << 20, block_size=BLOCK)


names = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=15
)


@given(
    st.lists(
        st.tuples(names, st.integers(1, 8), st.binary(max_size=64)),
        max_size=20,
        unique_by=lambda t: t[0].lower(),
    ).filter(lambda ps: all(name.lower() != "part" for name, _, _ in ps))
)
def test_round_trip(specs: list[tuple[str, int, bytes]]) -> None:
    parts = [ffs.Partition("part", 0, 2 * BLOCK, type=ffs.TYPE_PARTITION)]
    offset = 2 * BLOCK
    for name, blocks, data in specs:
        parts.append(ffs.Partition(name, offset, blocks * BLOCK, data=data))
        offset += blocks * BLOCK
    flash = max(offset, 4 * BLOCK)
    image = ffs.build_image(parts, flash_size=flash, block_size=BLOCK)
    table = ffs.read_table(image)
    assert table.block_size == BLOCK and table.flash_size == flash
    assert table.table_size == 2 * BLOCK
    assert [(e.name, e.offset, e.size, e.actual) for e in table.entries] == [
        (p.name, p.offset, p.size, p.size) for p in parts
    ]
    for p in parts[1:]:
        assert image[p.offset : p.offset + len(p.data)] == p.data
