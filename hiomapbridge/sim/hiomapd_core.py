"""The hiomapd emulator's protocol core: version negotiation, the window
cache in the LPC space, dirty/erase tracking, flushing, and the event byte.

Synchronous and bus-free: the D-Bus shell (:mod:`hiomapbridge.sim.hiomapd`)
calls one method per command and afterwards sends what
:meth:`Hiomapd.take_emissions` returns as ``PropertiesChanged`` signals.
Commands fail by raising :class:`HiomapdError` carrying an errno, which the
shell turns into the D-Bus error name sd-bus would produce; where hiomapd
itself would crash (a NULL dereference) they raise :class:`HiomapdCrash`.

Behaviour follows ``openbmc/hiomapd`` (``mboxd``) with the file backend, as
seen over its D-Bus transport (protocol.c, transport_dbus.c, windows.c,
control.c, file/backend.c, mboxd.c):

* Events: the byte is kept raw; every change is pushed through the version's
  mask (v2 ``0xC3``, v1 ``0x01`` only) and each push emits a
  ``PropertiesChanged`` naming **every property in that push's bit mask with
  its current value**, changed or not; an empty mask emits nothing. Start-up
  and the final signal at exit push the whole mask (all four properties); a
  set or a clear pushes the bits it set or cleared (so ``Ack(0x03)`` always
  sends ``WindowReset`` and ``ProtocolReset``); ``GetInfo`` re-sets every set
  bit, re-emitting them.
* No gate on the D-Bus transport: every command is served while flash control
  is suspended (FlashControlLost), and before ``GetInfo``. hiomapd starts at
  v2 but allocates the windows' dirty bytemaps only in ``GetInfo``, so opening
  a window before the very first ``GetInfo`` crashes it; after ``Reset`` the
  bytemaps stay and everything works.
* ``GetInfo(v)``: ``v`` < 1 is EINVAL, otherwise the version becomes
  ``min(v, 2)``; a version change drops the window cache (no flush, no
  event). Every ``GetInfo`` re-allocates the bytemaps (dirty marks of an open
  window are forgotten). v1 switches the daemon to v1 and 4 KiB blocks (kept
  after a later v2: the file backend's blocks are 4 KiB anyway), yet the
  D-Bus transport answers only v2, so the call fails ``UnknownMethod``.
  While v1 is active: ``GetFlashInfo`` returns the low and high 16 bits of
  the flash size in bytes; ``CreateRead/WriteWindow`` return the right LPC
  address but uninitialised size and offset; ``MarkDirty`` takes its offset
  as a flash block and an uninitialised byte count; ``Erase`` calls a NULL
  handler (crash).
* Windows: one active window, taken from a cache of ``window_count`` windows
  of ``window_size`` bytes laid out back to back in the LPC file, at LPC
  address ``lpc_base``. v2 maps the window-size-aligned region containing the
  requested offset (the requested size is ignored; the window is clipped at
  the end of flash); v1 maps exactly the requested offset. A cache hit reuses
  the window's memory as it is; a miss copies the flash into the least
  recently used window. A mapping starting past the flash end is EINVAL, one
  starting exactly at the end reads nothing: EIO. ``direct_map`` replaces the
  cache by one window covering the whole flash (LPC address = ``lpc_base`` +
  flash offset), for hosts such as QEMU that map their own PNOR linearly.
* Opening a window or closing the active one flushes a write window first.
* ``MarkDirty``/``Erase``/``Flush`` need an active write window (EPERM);
  ranges past its end are EACCES. ``Erase`` fills the window with 0xFF.
  Only ``Flush`` (or an implicit flush) writes the flash file.
* ``Reset`` drops the window cache without flushing and reloads the LPC space
  from the flash (the file backend's reset), with no event. A protocol reset
  (SIGHUP, and on a clean exit) does the same between clearing DaemonReady
  and setting DaemonReady | ProtocolReset.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import attrs

from hiomapbridge.events import ACKABLE, Event

BLOCK_SIZE_SHIFT_V1: Final = 12
FLASH_ACCESS_MS_PER_MB: Final = 8000  # hiomapd's estimate for the timeout hint
SHORT_LIFETIME: Final = 0x01
LPC_SPACE: Final = 1 << 28  # the LPC firmware space hiomapd addresses (28 bits)

EVENT_MASK_V1: Final = int(Event.PROTOCOL_RESET)
EVENT_MASK_V2: Final = int(
    Event.PROTOCOL_RESET
    | Event.WINDOW_RESET
    | Event.FLASH_CONTROL_LOST
    | Event.DAEMON_READY
)

# hiomapd's order of the properties in one PropertiesChanged.
_EMIT_ORDER: Final = (
    ("FlashControlLost", int(Event.FLASH_CONTROL_LOST)),
    ("DaemonReady", int(Event.DAEMON_READY)),
    ("WindowReset", int(Event.WINDOW_RESET)),
    ("ProtocolReset", int(Event.PROTOCOL_RESET)),
)

_CLEAN: Final = 0
_DIRTY: Final = 1
_ERASED: Final = 2

UNKNOWN_METHOD: Final = "org.freedesktop.DBus.Error.UnknownMethod"

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
    """A command failed with ``errno``, as hiomapd's handlers return -errno
    (``name`` overrides the error name sd-bus derives from it)."""

    def __init__(self, err: int, text: str, name: str | None = None) -> None:
        super().__init__(f"{errno.errorcode.get(err, str(err))}: {text}")
        self.errno = err
        self.text = text
        self._name = name

    @property
    def dbus_name(self) -> str:
        return self._name or dbus_error_name(self.errno)


class HiomapdCrash(Exception):
    """hiomapd would die here (SIGSEGV): no reply, no signal, the name goes."""


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
    """Emulator parameters (sizes and addresses in bytes).

    ``flash_size`` is used only when ``flash_path`` does not exist yet (the
    file is then created filled with 0xFF); an existing file's size is the
    flash size. ``block_size_shift`` is the erase size (and so the v2 block
    size) as a power of two; hiomapd's file backend uses 12. ``timeout`` None
    computes hiomapd's hint from the largest window (8 s per MiB, rounded up).
    ``strict_ack`` makes ACK bits outside 0x03 EINVAL (hiomapd ignores them).
    ``lpc_base`` is the LPC firmware address of the start of the window space
    (the windows' LPC addresses are ``lpc_base`` + their offset in the LPC
    file); real hiomapd maps its reserved memory at the top of the 28-bit
    space. ``direct_map`` serves one window covering the whole flash at
    ``lpc_base`` (``window_size`` and ``window_count`` are then unused), so
    that a window's LPC address is ``lpc_base`` + flash offset, as QEMU's
    powernv maps its PNOR (``lpc_base`` 0x0C000000).
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
    strict_ack: bool = False
    lpc_base: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    direct_map: bool = False

    @window_size.validator
    def _check_window_size(self, _attribute: object, value: int) -> None:
        if value < 1 << self.block_size_shift:
            raise ValueError("window_size must be at least one block")

    def __attrs_post_init__(self) -> None:
        if self.lpc_base % (1 << self.block_size_shift):
            raise ValueError(
                f"lpc_base {self.lpc_base:#x} is not a multiple of the block size"
            )
        if not self.direct_map and self.lpc_base + self.lpc_size > LPC_SPACE:
            raise ValueError(
                f"the window space ({self.lpc_size:#x} bytes at {self.lpc_base:#x})"
                " must fit the 28-bit LPC firmware space"
            )

    @property
    def lpc_size(self) -> int:
        """The window space's size (the flash size under ``direct_map``, known
        only once the flash is open: see :attr:`Hiomapd.lpc_size`)."""
        return self.window_size * self.window_count


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
    bytemap: bytearray | None = None  # None: not allocated yet (no GetInfo)


Emission = dict[str, bool]
"""One PropertiesChanged payload: property name -> value."""


class Hiomapd:
    """hiomapd's protocol state over a flash file and an mmap'ed LPC file.

    ``garbage`` supplies what hiomapd's uninitialised stack holds where it
    replies with it (v1 over D-Bus); tests may seed it.
    """

    def __init__(self, config: Config, garbage: random.Random | None = None) -> None:
        self.config = config
        self._flash_fd, self.flash_size = _open_flash(config)
        try:
            if config.direct_map:
                if config.lpc_base + self.flash_size > LPC_SPACE:
                    raise ValueError(
                        f"direct map: {self.flash_size:#x} bytes of flash at "
                        f"{config.lpc_base:#x} exceed the 28-bit LPC space"
                    )
                self.window_size, count = self.flash_size, 1
            else:
                self.window_size, count = config.window_size, config.window_count
            self.lpc_size = self.window_size * count
            self._lpc_fd, self._lpc = _open_lpc(config.lpc_path, self.lpc_size)
        except BaseException:
            os.close(self._flash_fd)
            raise
        self.garbage = garbage if garbage is not None else random.Random()
        self.version = 2  # hiomapd negotiates its maximum at start-up
        self.block_size_shift = config.block_size_shift
        self.erase_size = 1 << config.block_size_shift
        self.events = 0
        self.suspended = False
        self._windows = [_Window(mem=i * self.window_size) for i in range(count)]
        self._current: _Window | None = None
        self._current_is_write = False
        self._max_age = 0
        self._emissions: list[Emission] = []
        self._reset_protocol_state()

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

    @property
    def event_mask(self) -> int:
        """The bits the current protocol version passes to the transport."""
        return EVENT_MASK_V1 if self.version == 1 else EVENT_MASK_V2

    def _push(self, bits: int) -> None:
        """One PropertiesChanged naming the properties of ``bits`` (masked by
        the version) with their current values; nothing for no bits."""
        bits &= self.event_mask
        props = {
            name: bool(self.events & bit) for name, bit in _EMIT_ORDER if bits & bit
        }
        if props:
            self._emissions.append(props)

    def set_events(self, bits: int) -> None:
        """Set ``bits`` and emit them (even those already set)."""
        self.events |= bits & 0xFF
        self._push(bits)

    def clear_events(self, bits: int) -> None:
        """Clear ``bits`` and emit them (even those already clear)."""
        self.events &= ~bits & 0xFF
        self._push(bits)

    def put_events(self) -> None:
        """Emit every property of the version's mask (start-up and exit)."""
        self._push(0xFF)

    def property_values(self) -> dict[str, bool]:
        return {name: bool(self.events & bit) for name, bit in _EMIT_ORDER}

    def start(self) -> None:
        """Daemon start: DAEMON_READY | PROTOCOL_RESET, all four properties."""
        self.events |= Event.DAEMON_READY | Event.PROTOCOL_RESET
        self.put_events()

    def protocol_reset(self) -> None:
        """hiomapd's protocol_reset() (SIGHUP, and on exit): DaemonReady
        false; drop the windows, reload the LPC space; DaemonReady and
        ProtocolReset true."""
        self.clear_events(Event.DAEMON_READY)
        self._reset_protocol_state()
        self.set_events(Event.DAEMON_READY | Event.PROTOCOL_RESET)

    def stop(self) -> None:
        """Clean exit: the protocol reset, then DaemonReady false and
        ProtocolReset true, all four properties (three signals in all)."""
        self.protocol_reset()
        self.events = (self.events & ~Event.DAEMON_READY) | Event.PROTOCOL_RESET
        self.put_events()

    # -- control ------------------------------------------------------------

    def suspend(self) -> None:
        if not self.suspended:
            self.set_events(Event.FLASH_CONTROL_LOST)
            self.suspended = True

    def resume(self, modified: bool = False) -> None:
        if not self.suspended:
            return
        if modified and self._reset_windows():
            self.set_events(Event.WINDOW_RESET)
        self.clear_events(Event.FLASH_CONTROL_LOST)
        self.suspended = False

    def force_window_reset(self) -> None:
        """Drop the window cache (no flush) and set WINDOW_RESET (emitted even
        when it was already set)."""
        self._reset_windows()
        self.set_events(Event.WINDOW_RESET)

    # -- commands -----------------------------------------------------------

    def reset(self) -> None:
        """Host-requested: drop the windows (no flush), no event."""
        self._reset_protocol_state()

    def get_info(self, requested: int) -> tuple[int, int, int]:
        """Negotiate; returns ``(2, block_size_shift, timeout hint)``.
        Re-announces every set event bit; v1 raises UnknownMethod after
        switching to v1 (see the module doc)."""
        if requested < 1:
            raise HiomapdError(
                errno.EINVAL, f"unsupported protocol version {requested}"
            )
        version = min(requested, 2)
        if version != self.version:
            self.version = version
            self._reset_windows()
        if version == 1:
            self.block_size_shift = BLOCK_SIZE_SHIFT_V1
        self._alloc_bytemaps()
        timeout = self._suggested_timeout()
        self.set_events(self.events)
        if version == 1:
            raise HiomapdError(
                errno.EBADR,
                "Unknown method GetInfo: negotiated v1, which hiomapd's D-Bus "
                "transport does not answer",
                UNKNOWN_METHOD,
            )
        return 2, self.block_size_shift, timeout

    def get_flash_info(self) -> tuple[int, int]:
        """``(flash size, erase size)`` in blocks; under v1 the low and high
        halves of the flash size in bytes (hiomapd's v1 reply read as v2)."""
        if self.version == 1:
            size = self.flash_size & 0xFFFFFFFF
            return size & 0xFFFF, size >> 16
        shift = self.block_size_shift
        return (self.flash_size >> shift) & 0xFFFF, (self.erase_size >> shift) & 0xFFFF

    def create_window(
        self, offset: int, size: int, *, write: bool
    ) -> tuple[int, int, int]:
        """Open a window; returns ``(lpc address, size, flash offset)`` in blocks."""
        del size  # ignored: windows are window_size (clipped at the flash end)
        shift = self.block_size_shift
        if self._current is not None:
            if self._current_is_write:
                self._flush()
            self._close_current(0)
        offset_bytes = offset << shift
        exact = self.version == 1 and not self.config.direct_map
        window = self._search(offset_bytes, exact)
        if window is None:
            window = self._map(offset_bytes, exact)
        self._current = window
        self._current_is_write = write
        lpc = ((self.config.lpc_base + window.mem) >> shift) & 0xFFFF
        if self.version == 1:  # v1 fills in only the address
            return lpc, self.garbage.getrandbits(16), self.garbage.getrandbits(16)
        assert window.flash_offset is not None
        return lpc, (window.size >> shift) & 0xFFFF, window.flash_offset >> shift

    def close_window(self, flags: int) -> None:
        if self._current is None:
            return
        if self._current_is_write:
            self._flush()
        self._close_current(flags)

    def mark_dirty(self, offset: int, size: int) -> None:
        """v2: window offset and size in blocks. v1: ``offset`` is an absolute
        flash block and the byte count hiomapd reads is uninitialised."""
        window = self._write_window("MarkDirty")
        if self.version == 1:
            del size  # the D-Bus transport fills in the v2 field, not v1's
            assert window.flash_offset is not None
            start = window.flash_offset >> self.block_size_shift
            relative = (offset - start) & 0xFFFFFFFF
            if relative > offset:
                raise HiomapdError(errno.EINVAL, "MarkDirty before the window")
            block = 1 << self.block_size_shift
            count = self.garbage.getrandbits(32)
            count = ((count + block - 1) & ~(block - 1) & 0xFFFFFFFF) >> (
                self.block_size_shift
            )
            self._set_bytemap(window, relative, count, _DIRTY)
            return
        self._set_bytemap(window, offset, size, _DIRTY)

    def erase(self, offset: int, size: int) -> None:
        if self.version == 1:
            raise HiomapdCrash("Erase under v1: hiomapd calls a NULL erase handler")
        window = self._write_window("Erase")
        self._set_bytemap(window, offset, size, _ERASED)
        start = window.mem + (offset << self.block_size_shift)
        length = size << self.block_size_shift
        self._lpc[start : start + length] = b"\xff" * length

    def flush(self) -> None:
        self._write_window("Flush")
        self._flush()

    def ack(self, mask: int) -> None:
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

    def _suggested_timeout(self) -> int:
        if self.config.timeout is not None:
            return self.config.timeout
        mib = max(w.size for w in self._windows) >> 20
        return -(-mib * FLASH_ACCESS_MS_PER_MB // 1000) & 0xFFFF

    def _reset_protocol_state(self) -> None:
        """hiomapd's __protocol_reset() with the file backend: drop the
        windows, preload the LPC space with the start of the flash."""
        self._reset_windows()
        length = min(self.flash_size, self.lpc_size)
        self._lpc[:length] = os.pread(self._flash_fd, length, 0)

    def _alloc_bytemaps(self) -> None:
        for window in self._windows:
            window.bytemap = bytearray(self.window_size >> self.block_size_shift)

    def _write_window(self, command: str) -> _Window:
        if self._current is None or not self._current_is_write:
            raise HiomapdError(errno.EPERM, f"{command} without an open write window")
        return self._current

    def _set_bytemap(self, window: _Window, offset: int, size: int, value: int) -> None:
        blocks = window.size >> self.block_size_shift
        if offset + size > blocks:
            raise HiomapdError(
                errno.EACCES, f"blocks {offset}+{size} exceed the window of {blocks}"
            )
        if window.bytemap is None:
            if size:
                raise HiomapdCrash("no GetInfo yet: the dirty bytemap is NULL")
            return
        window.bytemap[offset : offset + size] = bytes([value]) * size

    def _flush(self) -> None:
        window = self._current
        assert window is not None and window.flash_offset is not None
        assert window.bytemap is not None
        shift = self.block_size_shift
        for kind, first, count in _runs(window.bytemap[: window.size >> shift]):
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

    def _reset_windows(self) -> bool:
        """Drop every window (no flush); whether one was open."""
        closed = self._current is not None
        self._current = None
        self._current_is_write = False
        for window in self._windows:
            self._reset_window(window)
        self._max_age = 0
        return closed

    def _reset_window(self, window: _Window) -> None:
        window.flash_offset = None
        window.size = self.window_size
        window.age = 0
        if window.bytemap is not None:
            window.bytemap[:] = bytes(len(window.bytemap))

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
        if self.config.direct_map:
            offset = 0 if offset < self.flash_size else offset
        elif not exact:
            offset &= ~(window.size - 1)
        if offset > self.flash_size:
            raise HiomapdError(
                errno.EINVAL,
                f"offset {offset:#x} is past the flash ({self.flash_size:#x})",
            )
        block = 1 << self.block_size_shift
        if offset + window.size > self.flash_size:
            window.size = self.flash_size - offset
            if self.version == 1:
                window.size -= window.size % block
        if window.size == 0:  # the file backend reads nothing: EIO
            self._reset_window(window)
            raise HiomapdError(errno.EIO, f"offset {offset:#x} is the flash end")
        data = os.pread(self._flash_fd, window.size, offset)
        window.size = -(-len(data) // block) * block
        data += b"\xff" * (window.size - len(data))
        self._lpc[window.mem : window.mem + window.size] = data
        if self.version == 1:
            # v1 windows may overlap: drop any other mapping of either end.
            ends = (offset, offset + window.size - 1)
            for other in self._windows:
                start = other.flash_offset
                if start is not None and any(
                    start <= end < start + other.size for end in ends
                ):
                    self._reset_window(other)
        self._set_bytemap(window, 0, window.size >> self.block_size_shift, _CLEAN)
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


def _open_lpc(path: Path, size: int) -> tuple[int, mmap.mmap]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
