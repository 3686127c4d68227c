"""A small FFS (PNOR partition table) writer and reader.

The layout is skiboot's ``libflash/ffs.h`` (all fields big-endian):

header, 48 bytes at flash offset 0 (the ``part`` partition)::

    0  magic "PART" (0x50415254)     24 block_count
    4  version (1)                   28 reserved[4]
    8  size (table size in blocks)   44 checksum
    12 entry_size (128)
    16 entry_count
    20 block_size (bytes)

then ``entry_count`` entries of 128 bytes::

    0  name (15 chars + NUL)         40 actual (bytes)
    16 base (blocks)                 44 reserved[4]
    20 size (blocks)                 60 user: chip, compresstype, datainteg
    24 pid (0xFFFFFFFF: top level)      (be16), vercheck, miscflags, 2 free,
    28 id                               14 reserved words
    32 type (1 data, 3 partition)    124 checksum
    36 flags

Each checksum is the XOR of the structure's 32-bit words before it, so the
XOR over the whole structure is zero (what skiboot checks). ECC is never
used here (``datainteg`` 0), so skiboot reads partitions as plain bytes.

:func:`make_pnor` writes the image this project boots skiboot with: ``part``,
``VERSION`` (a version string) and a blank (erased) ``NVRAM`` that skiboot
formats on first boot; the rest of the flash is erased (0xFF).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs

MAGIC: Final = 0x50415254  # "PART"
VERSION_1: Final = 1
PID_TOPLEVEL: Final = 0xFFFFFFFF
TYPE_DATA: Final = 1
TYPE_LOGICAL: Final = 2
TYPE_PARTITION: Final = 3
NAME_MAX: Final = 15
HEADER_SIZE: Final = 48
ENTRY_SIZE: Final = 128
ERASED: Final = 0xFF

KIB: Final = 1024
MIB: Final = 1024 * KIB
DEFAULT_FLASH_SIZE: Final = 32 * MIB
DEFAULT_BLOCK_SIZE: Final = 4 * KIB
NVRAM_MIN_SIZE: Final = 0x11010
"""skiboot's nvram_format needs 64 KiB common + 4 KiB firmware-private +
one 16-byte header."""
DEFAULT_NVRAM_SIZE: Final = 0x12000  # NVRAM_MIN_SIZE rounded up to a 4 KiB block
DEFAULT_VERSION_TEXT: Final = "hiomapbridge-test-pnor\n\thiomapbridge QEMU bench\n"

# magic, version, size, entry_size, entry_count, block_size, block_count,
# 4 reserved, checksum
_HEADER: Final = struct.Struct(">12I")
# name, base, size, pid, id, type, flags, actual, 4 reserved,
# user: chip, compresstype, datainteg, vercheck, miscflags, 2 free, 14 reserved,
# checksum
_ENTRY: Final = struct.Struct(">16s7I4I BBHBB2x14I I")
assert _HEADER.size == HEADER_SIZE and _ENTRY.size == ENTRY_SIZE


class FfsError(ValueError):
    """Not a valid partition table (bad magic, version, size or checksum)."""


def xor_checksum(data: bytes) -> int:
    """XOR of the big-endian 32-bit words of ``data`` (length a multiple of 4).

    skiboot XORs native words and compares with zero; a zero XOR is zero in
    either byte order, so storing this value big-endian satisfies it."""
    if len(data) % 4:
        raise ValueError("checksummed data must be whole 32-bit words")
    csum = 0
    for (word,) in struct.iter_unpack(">I", data):
        csum ^= word
    return csum


@attrs.frozen
class Partition:
    """A partition; ``offset`` and ``size`` in bytes (block multiples).

    ``data`` is written at the start of the partition (the rest is erased);
    ``actual`` defaults to ``size``."""

    name: str
    offset: int
    size: int
    data: bytes = b""
    type: int = TYPE_DATA
    flags: int = 0
    actual: int | None = None
    user: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    """chip, compresstype, datainteg, vercheck, miscflags."""

    @property
    def end(self) -> int:
        return self.offset + self.size


@attrs.frozen
class Entry:
    """One decoded table entry (offsets and sizes in bytes)."""

    name: str
    offset: int
    size: int
    actual: int
    pid: int
    id: int
    type: int
    flags: int
    user: tuple[int, int, int, int, int]


@attrs.frozen
class Table:
    """A decoded partition table."""

    block_size: int
    block_count: int
    table_size: int
    """Bytes covered by the table (header ``size`` times block size)."""
    entries: tuple[Entry, ...]

    @property
    def flash_size(self) -> int:
        return self.block_size * self.block_count

    def find(self, name: str) -> Entry | None:
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None


def _check_layout(
    partitions: Sequence[Partition], flash_size: int, block_size: int
) -> None:
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two")
    if flash_size <= 0 or flash_size % block_size:
        raise ValueError(f"flash size {flash_size} is not a block multiple")
    names: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for p in partitions:
        encoded = p.name.encode("ascii")
        if not encoded or len(encoded) > NAME_MAX or b"\0" in encoded:
            raise ValueError(f"bad partition name {p.name!r}")
        if p.name.lower() in names:
            raise ValueError(f"duplicate partition name {p.name!r}")
        names.add(p.name.lower())
        if p.offset % block_size or p.size % block_size or p.size <= 0:
            raise ValueError(f"{p.name}: offset/size not whole blocks")
        if p.end > flash_size:
            raise ValueError(f"{p.name}: ends past the flash ({p.end:#x})")
        if len(p.data) > p.size:
            raise ValueError(f"{p.name}: data larger than the partition")
        if p.actual is not None and not 0 <= p.actual <= p.size:
            raise ValueError(f"{p.name}: actual size out of range")
        spans.append((p.offset, p.end, p.name))
    spans.sort()
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"partitions {name} and {other} overlap")


def build_table(
    partitions: Sequence[Partition],
    *,
    flash_size: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> bytes:
    """Header plus entries for ``partitions``; the first must be the table's
    own ``part`` partition (type PARTITION) at offset 0, large enough."""
    _check_layout(partitions, flash_size, block_size)
    if not partitions or partitions[0].offset != 0:
        raise ValueError("the first partition must be the table itself, at 0")
    table_part = partitions[0]
    raw_size = HEADER_SIZE + ENTRY_SIZE * len(partitions)
    if raw_size > table_part.size:
        raise ValueError(f"{len(partitions)} entries do not fit in {table_part.name}")
    fields = [
        MAGIC, VERSION_1, table_part.size // block_size, ENTRY_SIZE,
        len(partitions), block_size, flash_size // block_size, 0, 0, 0, 0,
    ]  # fmt: skip
    header = _HEADER.pack(*fields, 0)
    out = bytearray(_HEADER.pack(*fields, xor_checksum(header[:-4])))
    for index, p in enumerate(partitions):
        chip, compresstype, datainteg, vercheck, miscflags = p.user
        values = [
            p.name.encode("ascii"),
            p.offset // block_size,
            p.size // block_size,
            PID_TOPLEVEL,
            index + 1,
            p.type,
            p.flags,
            p.size if p.actual is None else p.actual,
            0, 0, 0, 0,
            chip, compresstype, datainteg, vercheck, miscflags,
            *([0] * 14),
        ]  # fmt: skip
        blank = _ENTRY.pack(*values, 0)
        out += _ENTRY.pack(*values, xor_checksum(blank[:-4]))
    return bytes(out)


def build_image(
    partitions: Sequence[Partition],
    *,
    flash_size: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> bytes:
    """The whole flash: erased, the table at 0, each partition's data."""
    image = bytearray([ERASED]) * flash_size
    table = build_table(partitions, flash_size=flash_size, block_size=block_size)
    image[: len(table)] = table
    for p in partitions[1:]:
        image[p.offset : p.offset + len(p.data)] = p.data
    return bytes(image)


def default_partitions(
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    version_text: str = DEFAULT_VERSION_TEXT,
    nvram_size: int = DEFAULT_NVRAM_SIZE,
) -> list[Partition]:
    """``part`` (one block, or more if needed), ``VERSION`` (one block: the
    text, NUL padded) and a blank ``NVRAM``, back to back."""
    table_size = -(-(HEADER_SIZE + 3 * ENTRY_SIZE) // block_size) * block_size
    version = version_text.encode("ascii")
    version_size = max(block_size, -(-(len(version) + 1) // block_size) * block_size)
    nvram_size = -(-nvram_size // block_size) * block_size
    return [
        Partition("part", 0, table_size, type=TYPE_PARTITION),
        Partition(
            "VERSION",
            table_size,
            version_size,
            data=version.ljust(version_size, b"\0"),
        ),
        Partition("NVRAM", table_size + version_size, nvram_size),
    ]


def make_pnor(
    path: Path | str,
    size: int = DEFAULT_FLASH_SIZE,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    version_text: str = DEFAULT_VERSION_TEXT,
    nvram_size: int = DEFAULT_NVRAM_SIZE,
) -> Table:
    """Write a PNOR image of ``size`` bytes to ``path``; returns its table."""
    partitions = default_partitions(
        block_size=block_size, version_text=version_text, nvram_size=nvram_size
    )
    image = build_image(partitions, flash_size=size, block_size=block_size)
    Path(path).write_bytes(image)
    return read_table(image)


def read_table(image: bytes) -> Table:
    """Decode and check the table at the start of ``image`` (skiboot's checks:
    magic, version, header checksum, entry size, entries within the table,
    each entry's checksum)."""
    if len(image) < HEADER_SIZE:
        raise FfsError("image shorter than an FFS header")
    header = image[:HEADER_SIZE]
    (magic, version, size, entry_size, count, block_size, block_count,
     *_reserved, _csum) = _HEADER.unpack(header)  # fmt: skip
    if magic != MAGIC:
        raise FfsError(f"bad magic {magic:#010x}")
    if version != VERSION_1:
        raise FfsError(f"bad version {version}")
    if xor_checksum(header):
        raise FfsError("bad header checksum")
    if entry_size != ENTRY_SIZE:
        raise FfsError(f"bad entry size {entry_size}")
    if block_size == 0 or entry_size * count > block_size * size:
        raise FfsError("entries exceed the table size")
    end = HEADER_SIZE + ENTRY_SIZE * count
    if len(image) < end:
        raise FfsError("image shorter than its partition table")
    entries = []
    for i in range(count):
        raw = image[HEADER_SIZE + ENTRY_SIZE * i : HEADER_SIZE + ENTRY_SIZE * (i + 1)]
        if xor_checksum(raw):
            raise FfsError(f"bad checksum in entry {i}")
        (name, base, psize, pid, pid_, ptype, flags, actual, *rest) = _ENTRY.unpack(raw)
        chip, compresstype, datainteg, vercheck, miscflags = rest[4:9]
        entries.append(
            Entry(
                name=name.split(b"\0", 1)[0].decode("ascii", "replace"),
                offset=base * block_size,
                size=psize * block_size,
                actual=actual,
                pid=pid,
                id=pid_,
                type=ptype,
                flags=flags,
                user=(chip, compresstype, datainteg, vercheck, miscflags),
            )
        )
    return Table(block_size, block_count, size * block_size, tuple(entries))


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_FLASH_SIZE",
    "DEFAULT_NVRAM_SIZE",
    "ENTRY_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "Entry",
    "FfsError",
    "Partition",
    "Table",
    "build_image",
    "build_table",
    "default_partitions",
    "make_pnor",
    "read_table",
    "xor_checksum",
]
