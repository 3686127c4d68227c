"""The hiomapd emulator's protocol core: version negotiation, the window
cache in the LPC space, dirty/erase tracking, flushing, and the event byte.

Synchronous and bus-free: the D-Bus shell (:mod:`hiomapbridge.sim.hiomapd`)
calls one method per command and afterwards sends what
:meth:`Hiomapd.take_emissions` returns as ``PropertiesChanged`` signals.
Commands fail by raising :class:`HiomapdError` carrying an errno, which the
shell turns into the D-Bus error name sd-bus would produce.

Behaviour follows ``openbmc/hiomapd`` (Documentation/protocol.md, protocol.c,
windows.c, control.c, transport_mbox.c):

* ``GetInfo(v)``: ``v`` < 1 is EINVAL, otherwise the version is
  ``min(v, 2)``. A version change resets the window cache (no flush, no
  event). v1 uses 4 KiB blocks, v2 ``block_size_shift`` (block = erase size).
* Windows: one active window, taken from a cache of ``window_count`` windows
  of ``window_size`` bytes laid out back to back in the LPC file. v2 maps the
  window-size-aligned region containing the requested offset (the requested
  size is only a hint; the window is clipped at the end of flash); v1 maps
  exactly the requested offset. A cache hit reuses the window's memory as it
  is; a miss copies the flash into the least recently used window.
* Opening a window or closing the active one flushes a write window first.
* ``MarkDirty``/``Erase``/``Flush`` need an active write window (EPERM);
  ranges past its end are EINVAL. ``Erase`` fills the window with 0xFF.
  Only ``Flush`` (or an implicit flush) writes the flash file.
* While suspended every command but ``GetInfo`` and ``Ack`` is EBUSY; before
  ``GetInfo`` (and after ``Reset``) every command but ``Reset``, ``GetInfo``
  and ``Ack`` is EPROTO (the mbox transport's rules; configurable).
* ``Reset`` drops the window cache without flushing, as hiomapd does.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import attrs

from hiomapbridge.events import ACKABLE, PROPERTY_BITS, Event

BLOCK_SIZE_SHIFT_V1: Final = 12
FLASH_ACCESS_MS_PER_MB: Final = 8000  # hiomapd's estimate for the timeout hint
SHORT_LIFETIME: Final = 0x01

_CLEAN: Final = 0
_DIRTY: Final = 1
_ERASED: Final = 2

# sd-bus's errno -> error name table for the names hiomapd can produce;
# everything else becomes System.Error.<ERRNO NAME> (wire reference 5).
_DBUS_NAMES: Final[Mapping[int, str]] = {
    errno.EPERM: "org.freedesktop.DBus.Error.AccessDenied",
    errno.EACCES: "org.freedesktop.DBus.Error.AccessDenied",
    errno.EINVAL: "org.freedesktop.DBus.Error.InvalidArgs",
    errno.ETIMEDOUT: "org.freedesktop.DBus.Error.Timeout",
    errno.EIO: "org.freedesktop.DBus.Error.IOError",
    errno.EOPNOTSUPP: "org.freedesktop.DBus.Error.NotSupported",
    errno.ENOMEM: "org.freedesktop.DBus.Error.NoMemory",
    errno.ENOENT: "org.freedesktop.DBus.Error.FileNotFound",
}


def dbus_error_name(err: int) -> str:
    """The error name sd-bus sends for a handler returning ``-err``."""
    name = _DBUS_NAMES.get(err)
    if name is not None:
        return name
    return f"System.Error.{errno.errorcode.get(err, 'EIO')}"


class HiomapdError(Exception):
    """A command failed with ``errno``, as hiomapd's handlers return -errno."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(f"{errno.errorcode.get(err, str(err))}: {text}")
        self.errno = err
        self.text = text

    @property
    def dbus_name(self) -> str:
        return dbus_error_name(self.errno)


def _power_of_two(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{attribute.name} must be a power of two, not {value}")


def _optional_u16(
    _inst: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None and not 0 <= value <= 0xFFFF:
        raise ValueError(f"{attribute.name} must fit 16 bits, not {value}")


@attrs.frozen
class Config:
    """Emulator parameters (sizes in bytes).

    ``flash_size`` is used only when ``flash_path`` does not exist yet (the
    file is then created filled with 0xFF); an existing file's size is the
    flash size. ``timeout`` None computes hiomapd's hint from the window size
    (8 s per MiB, rounded up). ``v1_reply`` False reproduces hiomapd's bug of
    never answering a GetInfo that negotiates v1. ``strict_ack`` makes ACK
    bits outside 0x03 EINVAL (hiomapd ignores them). ``require_get_info``
    False serves commands before version negotiation.
    """

    flash_path: Path = attrs.field(converter=Path)
    lpc_path: Path = attrs.field(converter=Path)
    flash_size: int = attrs.field(default=32 << 20)
    block_size_shift: int = attrs.field(
        default=12, validator=[attrs.validators.ge(12), attrs.validators.le(24)]
    )
    window_size: int = attrs.field(default=1 << 20, validator=_power_of_two)
    window_count: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    timeout: int | None = attrs.field(default=None, validator=_optional_u16)
    v1_reply: bool = True
    strict_ack: bool = False
    require_get_info: bool = True

    @window_size.validator
    def _check_window_size(self, _attribute: object, value: int) -> None:
        if value < 1 << self.block_size_shift:
            raise ValueError("window_size must be at least one block")
        if (self.window_count * value) >> BLOCK_SIZE_SHIFT_V1 > 0x10000:
            raise ValueError("the LPC window space must fit 16-bit block addresses")

    @property
    def lpc_size(self) -> int:
        return self.window_size * self.window_count

    @property
    def timeout_hint(self) -> int:
        """GET_INFO's suggested timeout in seconds."""
        if self.timeout is not None:
            return self.timeout
        mib = self.window_size >> 20
        return -(-mib * FLASH_ACCESS_MS_PER_MB // 1000)


@attrs.frozen
class WindowInfo:
    """The active window, in bytes (for tests and logs)."""

    lpc_offset: int
    flash_offset: int
    size: int
    write: bool


@attrs.define
class _Window:
    mem: int  # byte offset of the window in the LPC space
    size: int = 0
    flash_offset: int | None = None
    age: int = 0
    bytemap: bytearray = attrs.field(factory=bytearray)


Emission = dict[str, bool]
"""One PropertiesChanged payload: property name -> new value."""


class Hiomapd:
    """hiomapd's protocol state over a flash file and an mmap'ed LPC file."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._flash_fd, self.flash_size = _open_flash(config)
        try:
            self._lpc_fd, self._lpc = _open_lpc(config)
        except BaseException:
            os.close(self._flash_fd)
            raise
        self.version = 2  # hiomapd negotiates its maximum at start-up
        self.negotiated = False
        self.block_size_shift = config.block_size_shift
        self.events = 0
        self.suspended = False
        self._windows = [
            _Window(mem=i * config.window_size) for i in range(config.window_count)
        ]
        self._current: _Window | None = None
        self._current_is_write = False
        self._max_age = 0
        self._emissions: list[Emission] = []
        self._reset_windows()

    def close(self) -> None:
        if self._flash_fd < 0:
            return
        self._lpc.close()
        os.close(self._lpc_fd)
        os.close(self._flash_fd)
        self._flash_fd = -1

    # -- events -------------------------------------------------------------

    def take_emissions(self) -> list[Emission]:
        """The PropertiesChanged payloads due since the last call, in order."""
        out, self._emissions = self._emissions, []
        return out

    def set_events(self, bits: int) -> None:
        self._change_events(self.events | bits)

    def clear_events(self, bits: int) -> None:
        self._change_events(self.events & ~bits)

    def _change_events(self, new: int) -> None:
        changed = {
            name: bool(new & bit)
            for name, bit in PROPERTY_BITS.items()
            if (new ^ self.events) & bit
        }
        self.events = new & 0xFF
        if changed:
            self._emissions.append(changed)

    def announce_set_events(self) -> None:
        """Re-emit every set bit (what hiomapd does on GetInfo)."""
        props = {name: True for name, bit in PROPERTY_BITS.items() if self.events & bit}
        if props:
            self._emissions.append(props)

    def property_values(self) -> dict[str, bool]:
        return {name: bool(self.events & bit) for name, bit in PROPERTY_BITS.items()}

    def start(self) -> None:
        """Daemon start: DAEMON_READY | PROTOCOL_RESET (0x81)."""
        self.set_events(Event.DAEMON_READY | Event.PROTOCOL_RESET)

    def stop(self) -> None:
        """Clean exit: DaemonReady false; the protocol reset (DaemonReady and
        ProtocolReset true); the final state 0x01 (every other bit cleared)."""
        self.clear_events(Event.DAEMON_READY)
        self.events |= Event.DAEMON_READY | Event.PROTOCOL_RESET
        self._emissions.append({"DaemonReady": True, "ProtocolReset": True})
        final = {
            name: bit == Event.PROTOCOL_RESET
            for name, bit in PROPERTY_BITS.items()
            if self.events & bit or bit == Event.PROTOCOL_RESET
        }
        self.events = int(Event.PROTOCOL_RESET)
        self._emissions.append(final)
        self._current = None
        self._current_is_write = False

    # -- control ------------------------------------------------------------

    def suspend(self) -> None:
        if not self.suspended:
            self.set_events(Event.FLASH_CONTROL_LOST)
            self.suspended = True

    def resume(self, modified: bool = False) -> None:
        if not self.suspended:
            return
        if modified:
            had_window = self._current is not None
            self._reset_windows()
            if had_window:
                self.set_events(Event.WINDOW_RESET)
        self.clear_events(Event.FLASH_CONTROL_LOST)
        self.suspended = False

    def force_window_reset(self) -> None:
        """Drop the window cache (no flush) and raise WINDOW_RESET; always
        emits, even when the bit was already set."""
        self._reset_windows()
        self.events |= Event.WINDOW_RESET
        self._emissions.append({"WindowReset": True})

    # -- commands -----------------------------------------------------------

    def _gate(self, command: str) -> None:
        if self.suspended and command not in ("GetInfo", "Ack"):
            raise HiomapdError(errno.EBUSY, f"{command}: flash control suspended")
        if (
            self.config.require_get_info
            and not self.negotiated
            and command not in ("Reset", "GetInfo", "Ack")
        ):
            raise HiomapdError(errno.EPROTO, f"{command}: GetInfo must come first")

    def reset(self) -> None:
        self._gate("Reset")
        self._reset_windows()
        self.negotiated = False

    def get_info(self, requested: int) -> tuple[int, int, int]:
        """Negotiate; returns ``(version, block_size_shift, q)`` where ``q`` is
        the timeout hint (v2) or the default window size in blocks (v1).
        Re-announces every set event bit."""
        self._gate("GetInfo")
        if requested < 1:
            raise HiomapdError(
                errno.EINVAL, f"unsupported protocol version {requested}"
            )
        version = min(requested, 2)
        shift = BLOCK_SIZE_SHIFT_V1 if version == 1 else self.config.block_size_shift
        if version != self.version or shift != self.block_size_shift:
            self.version = version
            self.block_size_shift = shift
            self._reset_windows()
        self.negotiated = True
        self.announce_set_events()
        if version == 1:
            return 1, shift, self.config.window_size >> shift
        return 2, shift, self.config.timeout_hint

    def get_flash_info(self) -> tuple[int, int]:
        """``(flash size, erase size)`` in blocks (also for v1: see module doc)."""
        self._gate("GetFlashInfo")
        erase = 1 << self.config.block_size_shift
        return self.flash_size >> self.block_size_shift, erase >> self.block_size_shift

    def create_window(
        self, offset: int, size: int, *, write: bool
    ) -> tuple[int, int, int]:
        """Open a window; returns ``(lpc address, size, flash offset)`` in blocks."""
        del size  # only a hint: windows are window_size (clipped at the flash end)
        self._gate("CreateWriteWindow" if write else "CreateReadWindow")
        shift = self.block_size_shift
        if self._current is not None:
            if self._current_is_write:
                self._flush()
            self._close_current(0)
        offset_bytes = offset << shift
        exact = self.version == 1
        window = self._search(offset_bytes, exact)
        if window is None:
            window = self._map(offset_bytes, exact)
        self._current = window
        self._current_is_write = write
        assert window.flash_offset is not None
        return window.mem >> shift, window.size >> shift, window.flash_offset >> shift

    def close_window(self, flags: int) -> None:
        self._gate("CloseWindow")
        if self._current is None:
            return
        if self._current_is_write:
            self._flush()
        self._close_current(flags)

    def mark_dirty(self, offset: int, size: int) -> None:
        """v2: window offset and size in blocks. v1 (as the D-Bus ``qq`` carries
        it): absolute flash offset in blocks and size in bytes."""
        self._gate("MarkDirty")
        window = self._write_window("MarkDirty")
        if self.version == 1:
            assert window.flash_offset is not None
            start = window.flash_offset >> self.block_size_shift
            if offset < start:
                raise HiomapdError(errno.EINVAL, "MarkDirty before the window")
            offset -= start
            block = 1 << self.block_size_shift
            size = (size + block - 1) // block
        self._set_bytemap(window, offset, size, _DIRTY)

    def erase(self, offset: int, size: int) -> None:
        self._gate("Erase")
        if self.version == 1:
            raise HiomapdError(errno.EOPNOTSUPP, "Erase is not in protocol v1")
        window = self._write_window("Erase")
        self._set_bytemap(window, offset, size, _ERASED)
        start = window.mem + (offset << self.block_size_shift)
        length = size << self.block_size_shift
        self._lpc[start : start + length] = b"\xff" * length

    def flush(self) -> None:
        self._gate("Flush")
        self._write_window("Flush")
        self._flush()

    def ack(self, mask: int) -> None:
        self._gate("Ack")
        if self.config.strict_ack and mask & ~ACKABLE:
            raise HiomapdError(
                errno.EINVAL, f"Ack mask {mask:#04x} has bits other than 0x03"
            )
        self.clear_events(mask & ACKABLE)

    # -- state for tests ----------------------------------------------------

    @property
    def current_window(self) -> WindowInfo | None:
        window = self._current
        if window is None or window.flash_offset is None:
            return None
        return WindowInfo(
            window.mem, window.flash_offset, window.size, self._current_is_write
        )

    def read_flash(self, offset: int, size: int) -> bytes:
        return os.pread(self._flash_fd, size, offset)

    def read_lpc(self, offset: int, size: int) -> bytes:
        return bytes(self._lpc[offset : offset + size])

    def write_lpc(self, offset: int, data: bytes) -> None:
        """What a host write through the LPC firmware space does."""
        if offset < 0 or offset + len(data) > len(self._lpc):
            raise ValueError("write outside the LPC window space")
        self._lpc[offset : offset + len(data)] = data

    # -- windows ------------------------------------------------------------

    def _write_window(self, command: str) -> _Window:
        if self._current is None or not self._current_is_write:
            raise HiomapdError(errno.EPERM, f"{command} without an open write window")
        return self._current

    def _blocks(self, window: _Window) -> int:
        return window.size >> self.block_size_shift

    def _set_bytemap(self, window: _Window, offset: int, size: int, value: int) -> None:
        if offset + size > self._blocks(window):
            raise HiomapdError(
                errno.EINVAL,
                f"blocks {offset}+{size} exceed the window of {self._blocks(window)}",
            )
        window.bytemap[offset : offset + size] = bytes([value]) * size

    def _flush(self) -> None:
        window = self._current
        assert window is not None and window.flash_offset is not None
        shift = self.block_size_shift
        for kind, first, count in _runs(window.bytemap[: self._blocks(window)]):
            start, length = first << shift, count << shift
            if kind == _DIRTY:
                data = self._lpc[window.mem + start : window.mem + start + length]
            else:
                data = b"\xff" * length
            os.pwrite(self._flash_fd, data, window.flash_offset + start)
        window.bytemap[:] = bytes(len(window.bytemap))

    def _close_current(self, flags: int) -> None:
        if self._current is not None and flags & SHORT_LIFETIME:
            self._current.age = 0
        self._current = None
        self._current_is_write = False

    def _reset_windows(self) -> None:
        self._current = None
        self._current_is_write = False
        for window in self._windows:
            self._reset_window(window)
        self._max_age = 0

    def _reset_window(self, window: _Window) -> None:
        window.flash_offset = None
        window.size = self.config.window_size
        window.age = 0
        window.bytemap = bytearray(self.config.window_size >> self.block_size_shift)

    def _search(self, offset: int, exact: bool) -> _Window | None:
        for window in self._windows:
            start = window.flash_offset
            if start is None or not start <= offset < start + window.size:
                continue
            if exact and start != offset:
                continue
            self._max_age += 1
            window.age = self._max_age
            return window
        return None

    def _map(self, offset: int, exact: bool) -> _Window:
        window = next((w for w in self._windows if w.flash_offset is None), None)
        if window is None:
            window = min(self._windows, key=lambda w: w.age)
            self._reset_window(window)
        if not exact:
            offset &= ~(window.size - 1)
        if offset >= self.flash_size:
            raise HiomapdError(
                errno.EINVAL,
                f"offset {offset:#x} is past the flash ({self.flash_size:#x})",
            )
        window.size = min(window.size, self.flash_size - offset)
        block = 1 << self.block_size_shift
        window.size -= window.size % block
        if window.size == 0:
            raise HiomapdError(errno.EINVAL, f"offset {offset:#x} maps no whole block")
        data = os.pread(self._flash_fd, window.size, offset)
        data += b"\xff" * (window.size - len(data))
        self._lpc[window.mem : window.mem + window.size] = data
        if exact:  # v1: windows may overlap; drop any other mapping this range
            for other in self._windows:
                if other is window or other.flash_offset is None:
                    continue
                if other.flash_offset < offset + window.size and offset < (
                    other.flash_offset + other.size
                ):
                    self._reset_window(other)
        window.bytemap[:] = bytes(len(window.bytemap))
        window.flash_offset = offset
        self._max_age += 1
        window.age = self._max_age
        return window


def _runs(bytemap: bytearray) -> Iterator[tuple[int, int, int]]:
    """``(kind, first block, count)`` for each run of dirty or erased blocks."""
    start = 0
    while start < len(bytemap):
        kind = bytemap[start]
        end = start + 1
        while end < len(bytemap) and bytemap[end] == kind:
            end += 1
        if kind != _CLEAN:
            yield kind, start, end - start
        start = end


def _open_flash(config: Config) -> tuple[int, int]:
    path = config.flash_path
    if not path.exists():
        if config.flash_size <= 0:
            raise ValueError("flash_size must be positive")
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            chunk = b"\xff" * (1 << 20)
            left = config.flash_size
            while left:
                left -= f.write(chunk[: min(left, len(chunk))])
        tmp.replace(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    block = 1 << config.block_size_shift
    if size == 0 or size % block:
        os.close(fd)
        raise ValueError(f"{path}: flash size {size} is not a multiple of {block}")
    if size >> BLOCK_SIZE_SHIFT_V1 > 0xFFFF:
        os.close(fd)
        raise ValueError(f"{path}: flash of {size} bytes does not fit 16-bit v1 blocks")
    return fd, size


def _open_lpc(config: Config) -> tuple[int, mmap.mmap]:
    fd = os.open(config.lpc_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size != config.lpc_size:
            os.ftruncate(fd, config.lpc_size)
        return fd, mmap.mmap(fd, config.lpc_size)
    except BaseException:
        os.close(fd)
        raise
