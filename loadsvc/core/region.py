"""The shared-memory snapshot region: one file, one slot per rank, no locks on the hot paths.

    ShmPublisher(rank r) --publish()--> slot r: buffer A | buffer B   (write the idle one,
                                           ^                            then flip seq[r])
    ShmReader --read_all()--> seq[0..N] (one copy, one compare) -> cached snapshots

Layout (little-endian, every word 8-byte aligned so a store through
``memoryview(...).cast("Q")`` is one aligned 8-byte store):

    header   (256 B)  magic, layout version, header size, schema fingerprint,
                      slot count, slot size, payload capacity, creation time
    seq[N]   (8 B each, side by side) last complete publish of each rank;
                      0 = never published
    slot[N]  (slot size each) two buffers; buffer (n & 1) holds publish n:
                      word 0  state: 2n+1 while being written, 2n when complete
                      word 1  publish time, Unix ns
                      word 2  payload length << 32 | crc32
                      word 3  reserved
                      payload (msgpack of LoadSnapshot)

Writer, publish n: state = 2n+1; copy payload; time; length|crc; state = 2n;
seq[r] = n. It never waits: readers and other ranks cannot hold it up.

Reader: n = seq[r]; if n is the cached sequence, return the cached snapshot.
Otherwise read buffer (n & 1): state must be 2n before and after the copy and
the checksum (seeded with n and the publish time) must match the bytes copied.
On weakly ordered CPUs, where Python has no fences, the checksum rather than the
sequence decides validity. A writer preempted in the middle of publish n+1 is
writing the other buffer, so readers keep reading publish n undisturbed. After
a bounded number of retries the reader returns its last good copy of that rank
(which turns stale with time), or None if it never had one.

Values: a payload is decoded with the Structs of loadsvc.core.schema, which carry the
value rule (no number negative, NaN or infinite; ints within their protobuf
type). A checksum-valid payload that breaks it (a foreign or buggy writer) is
refused like any undecodable one: counted as ``corrupt``, the last good copy
kept. ShmPublisher.publish applies the same decode before writing, so what it
writes every reader accepts.

Creation: the file is built under a temporary name, complete with its header,
then hard-linked into place, so nobody ever sees a half-written header. A file
that exists is validated: wrong magic, layout version, schema fingerprint or
slot count is a RegionError naming the file and what differs.

Truncation: anyone who may write the file can truncate it at any moment, and
touching a mapping past the end of its file raises SIGBUS, which kills the
process; checking the size first only narrows that window. So readers never
touch the mapping unguarded: loadsvc.core._shmfast copies out of it in C under a
SIGBUS guard (a fault ends the copy short instead), and without the C module
readers read the file with os.pread (a short read, never a fault). Opening
reads the header with pread and maps only the size the header describes. A
reader whose file shrank raises RegionError; the server's store then detaches
and re-attaches once the file is valid again. An engine's ShmPublisher keeps
storing through the mapping (no syscall per publish), so truncating the file
under a live engine kills that engine; the collector in the server, which
writes remote ranks, uses PwritePublisher instead.

Ownership: each publisher holds an advisory lock on one byte of its slot for
its whole life, taken once when it attaches, never while publishing. A second
publisher for the same rank gets a RegionError; the kernel drops the lock when
the owner dies, so a restarted engine takes over. On Linux it is an open file
description lock (F_OFD_SETLK), which belongs to the publisher's own descriptor:
a POSIX record lock (lockf) would be dropped whenever the process closed any
other descriptor of the file (a reader, another rank's publisher, create_region).
"""

from __future__ import annotations

import binascii
import errno
import fcntl
import mmap
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import msgspec

from loadsvc._closing import Closing
from loadsvc._exceptions import RegionError
from loadsvc.core import schema
from loadsvc.core.schema import LoadSnapshot, Status

__all__ = [
    "ShmPublisher",
    "ShmReader",
    "RegionError",
    "create_region",
    "default_path",
    "freshness",
    "native_read_loop",
    "DEFAULT_PAYLOAD_CAPACITY",
]

MAGIC = b"LOADSVC\x00"
LAYOUT_VERSION = 1
HEADER_SIZE = 256
BUFFER_HEADER = 32  # four words before each buffer's payload
DEFAULT_PAYLOAD_CAPACITY = 2048
MAX_SLOTS = 65536
READ_RETRIES = 8

# magic, version, header_size, fingerprint, slot_count, slot_size, payload_capacity, reserved, created_ns
_HEADER = struct.Struct("<8sIIQIIIIQ")
# state, publish time ns, length << 32 | crc32, reserved
_BUFFER_HEADER = struct.Struct("<QQQQ")
_BUFFER_STATE = struct.Struct("<QQQ")  # the first three of them
_WORD = struct.Struct("<Q")
# Bytes of payload the Python read loop copies with a buffer's header in one
# pread (payloads are about 120-400 bytes); a longer one takes a second read.
_FIRST_READ = 1024

DEFAULT_STALE_AFTER = 3.0
DEFAULT_UNREACHABLE_AFTER = 30.0


def default_path(instance: str = "default") -> Path:
    """`/dev/shm/loadsvc-<instance>.shm`, or the temp dir where /dev/shm does not exist."""
    base = Path("/dev/shm")
    if not base.is_dir():
        base = Path(tempfile.gettempdir())
    return base / f"loadsvc-{instance}.shm"


def freshness(publish_time_ns: int, now_ns: int, stale_after: float = DEFAULT_STALE_AFTER,
              unreachable_after: float = DEFAULT_UNREACHABLE_AFTER) -> tuple[Status, float]:
    """(Status, age in ms) of a snapshot published at publish_time_ns, seen at now_ns.

    healthy while age <= stale_after seconds, stale until unreachable_after,
    unreachable beyond it or when never published (publish_time_ns == 0).
    A publish time in the future (another clock) counts as age 0.
    """
    if publish_time_ns <= 0:
        return Status.UNREACHABLE, 0.0
    age_ms = max(0.0, (now_ns - publish_time_ns) / 1e6)
    if age_ms <= stale_after * 1000.0:
        return Status.HEALTHY, age_ms
    if age_ms <= unreachable_after * 1000.0:
        return Status.STALE, age_ms
    return Status.UNREACHABLE, age_ms


def _layout(slot_count: int, payload_capacity: int) -> tuple[int, int, int]:
    """(seq offset, slots offset, slot size) for a region of slot_count slots."""
    seq_off = HEADER_SIZE
    slots_off = (seq_off + 8 * slot_count + 63) // 64 * 64
    buf_size = (BUFFER_HEADER + payload_capacity + 63) // 64 * 64
    return seq_off, slots_off, 2 * buf_size


# The checksum is seeded with (n * _CRC_MUL ^ publish time) & 0xFFFFFFFF, binding
# it to the publish it belongs to: an old payload still sitting in a buffer can
# never pass for a newer publish. Written out inline on both hot paths.
_CRC_MUL = 0x9E3779B1
# What decoding a checksum-valid but malformed payload can raise (msgspec raises
# UnicodeDecodeError, not DecodeError, for an enum string that is not UTF-8).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)
# CRC-32 (the zlib polynomial; zlib.crc32 gives the same values). binascii's
# implementation uses one 1 KiB table where zlib's braided one spans tens of KiB:
# on short payloads between other work (a scheduler loop, a server) zlib's takes
# cache misses (measured here, 8 checks of 123 bytes after other work: about
# 1.7 us with binascii, 4 to 14 us with zlib).
_crc32 = binascii.crc32
_time_ns = time.time_ns

# The changed-rank loop of read_all in C (loadsvc/core/_shmfast.c): the same checks
# with acquire loads, the same checksum, the same decoder; ranks it cannot read
# go through _refresh as in the Python loop. Built at install when a compiler is
# there (optional in pyproject.toml); without it the Python loop runs.
_native_copy: Callable[[Any, int, int], bytes] | None = None
_install_guard: Callable[[], None] | None = None
_native_read_changed: Callable[..., list[int] | None] | None = None
try:
    from loadsvc.core import _shmfast
except ImportError:  # not built: the Python loop, reading with os.pread
    pass
else:
    _native_copy, _install_guard = _shmfast.copy, _shmfast.install_guard
    _native_read_changed = _shmfast.read_changed


def native_read_loop() -> bool:
    """True when loadsvc.core._shmfast was built, so readers run read_all's changed-rank loop in C."""
    return _native_read_changed is not None


class _Region:
    """An open, validated region file mapped into memory."""

    def __init__(self, path: Path, fd: int, writable: bool) -> None:
        self.path = path
        self.fd = fd
        # The file may shrink at any moment (anyone who may write it can truncate
        # it): the header is read with pread, never through a mapping, and only
        # the size the header describes is mapped; mmap refuses a length beyond
        # the end of the file, which is then a RegionError like any other.
        size = os.fstat(fd).st_size
        header = os.pread(fd, HEADER_SIZE, 0)
        if len(header) < HEADER_SIZE:
            raise RegionError(f"{path}: file is {min(size, len(header))} bytes, smaller than the "
                              f"{HEADER_SIZE}-byte header; not a loadsvc region (or truncated); "
                              "remove it to start afresh")
        need = self._validate(header, size)
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        try:
            self.mm = mmap.mmap(fd, need, access=access)
        except ValueError:  # "mmap length is greater than file size": it shrank since the fstat
            raise RegionError(f"{path}: file shrank below the {need} bytes its header describes "
                              "while being opened (truncated)") from None
        self.q = memoryview(self.mm).cast("Q")
        self.seq_off, self.slots_off, self.slot_size = _layout(self.slot_count, self.payload_capacity)

    def _validate(self, header: bytes, size: int) -> int:
        """Check the header against this loadsvc and the file's size; return the size it describes."""
        (magic, version, header_size, fingerprint, slot_count, slot_size, capacity, _r,
         created_ns) = _HEADER.unpack_from(header, 0)
        where = f"{self.path}"
        if magic != MAGIC:
            raise RegionError(f"{where}: bad magic {magic!r}, expected {MAGIC!r}; "
                              "not a loadsvc region (or corrupt)")
        if version != LAYOUT_VERSION:
            raise RegionError(f"{where}: layout version {version}, this loadsvc reads version "
                              f"{LAYOUT_VERSION}; restart every process on one loadsvc version")
        if fingerprint != schema.SCHEMA_FINGERPRINT:
            raise RegionError(f"{where}: schema fingerprint {fingerprint:#018x} differs from this "
                              f"loadsvc's {schema.SCHEMA_FINGERPRINT:#018x}; the region was made by a "
                              "loadsvc with another LoadSnapshot schema")
        if header_size != HEADER_SIZE or not 1 <= slot_count <= MAX_SLOTS or not 0 < capacity <= 1 << 24:
            raise RegionError(f"{where}: corrupt header (header size {header_size}, slot count "
                              f"{slot_count}, payload capacity {capacity})")
        _, slots_off, expect_slot = _layout(slot_count, capacity)
        if slot_size != expect_slot:
            raise RegionError(f"{where}: corrupt header (slot size {slot_size}, expected {expect_slot} "
                              f"for payload capacity {capacity})")
        need: int = slots_off + slot_count * slot_size
        if size < need:
            raise RegionError(f"{where}: file is {size} bytes, the header describes {need} "
                              f"({slot_count} slots); truncated")
        self.slot_count = slot_count
        self.payload_capacity = capacity
        self.created_ns = created_ns
        return need

    def buffer_offset(self, rank: int, n: int) -> int:
        return self.slots_off + rank * self.slot_size + (n & 1) * (self.slot_size // 2)

    def close(self) -> None:
        # Idempotent: a failed ShmPublisher closes its region and is closed again
        # by __del__; a second os.close could hit a descriptor reused meanwhile.
        if self.fd < 0:
            return
        try:
            self.q.release()
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the process
        fd, self.fd = self.fd, -1
        os.close(fd)


def _create_or_open(path: Path, dp_size: int, payload_capacity: int, mode: int) -> int:
    """Open path read-write, creating it atomically (complete header) if missing."""
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        pass
    except OSError as e:  # EACCES, ENOTDIR, ...: say which file and why
        raise RegionError(f"cannot open region {path} read-write: {e.strerror}; check the path "
                          "and the file's owner and mode") from e
    if not 1 <= dp_size <= MAX_SLOTS:
        raise ValueError(f"dp_size must be 1..{MAX_SLOTS}, got {dp_size}")
    seq_off, slots_off, slot_size = _layout(dp_size, payload_capacity)
    size = slots_off + dp_size * slot_size
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise RegionError(f"cannot create region {path} (in {path.parent}): {e.strerror}") from e
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked
        try:
            # Reserve every page now: on a full /dev/shm this fails here with
            # ENOSPC instead of a SIGBUS at the first publish.
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise RegionError(f"cannot create region {path}: {e.strerror} "
                                  f"({size} bytes needed in {path.parent})") from e
            os.ftruncate(fd, size)
        header = _HEADER.pack(MAGIC, LAYOUT_VERSION, HEADER_SIZE, schema.SCHEMA_FINGERPRINT,
                              dp_size, slot_size, payload_capacity, 0, time.time_ns())
        os.pwrite(fd, header, 0)
        try:
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)  # someone else won the race; use theirs
            return os.open(path, os.O_RDWR)
        return fd
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def create_region(path: str | os.PathLike[str], dp_size: int, *,
                  payload_capacity: int = DEFAULT_PAYLOAD_CAPACITY, mode: int = 0o600) -> None:
    """Create the region at path if missing (atomically); check dp_size if it exists.

    For a server started with --dp-size before any publisher.
    """
    path = Path(path)
    fd = _create_or_open(path, dp_size, payload_capacity, mode)
    region = _Region(path, fd, writable=False)
    try:
        if region.slot_count != dp_size:
            raise RegionError(f"{path}: region has dp_size {region.slot_count}, expected dp_size "
                              f"{dp_size}; use the same --dp-size everywhere or remove the file")
    finally:
        region.close()


# Ranks owned by publishers of this process, per region file: gives a second
# publisher in the same process a clear message (and is the only guard where
# only per-process lockf locks exist).
_OWNED: set[tuple[int, int, int]] = set()

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid, padding.
_FLOCK = struct.Struct("hhqqi4x")


def _lock_byte(fd: int, offset: int) -> None:
    """Lock one byte of fd exclusively without waiting; OSError when someone holds it."""
    if _F_OFD_SETLK is not None and _FLOCK.size == 32:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    else:  # per process: closing any descriptor of the file drops it
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)


class ShmPublisher(Closing):
    """The engine side: publishes one rank's snapshots into the region.

    ``ShmPublisher(path, dp_size=8, dp_rank=3)`` creates the region if it does
    not exist (mode 0600 unless ``mode`` says otherwise) or attaches to it.
    ``publish(snapshot)`` never blocks. ``maybe_publish(build)`` calls build()
    and publishes on every ``interval``-th call, so a scheduler loop can call it
    every iteration.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, dp_size: int, dp_rank: int,
                 interval: int = 1, payload_capacity: int = DEFAULT_PAYLOAD_CAPACITY,
                 mode: int = 0o600, _exclusive: bool = True) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in 0..{dp_size - 1} for dp_size={dp_size}, got {dp_rank}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.path = Path(path) if path is not None else default_path()
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.interval = interval
        self._calls = 0
        fd = _create_or_open(self.path, dp_size, payload_capacity, mode)
        try:
            self._region = _Region(self.path, fd, writable=True)
        except BaseException:
            os.close(fd)
            raise
        r = self._region
        if r.slot_count != dp_size:
            r.close()
            raise RegionError(f"{self.path}: region has dp_size {r.slot_count}, this publisher "
                              f"expects dp_size {dp_size}; use the same --dp-size everywhere or "
                              "remove the file")
        self._owned: tuple[int, int, int] | None = None
        if _exclusive:
            self._claim()
        self._q, self._mm = self._stores(r)
        self._seq_index = r.seq_off // 8 + dp_rank
        self._capacity = r.payload_capacity
        self._buffers = (r.buffer_offset(dp_rank, 0), r.buffer_offset(dp_rank, 1))
        self._seq: int = self._q[self._seq_index]  # continue after a previous owner
        self._encode = msgspec.msgpack.Encoder().encode
        self._check = msgspec.msgpack.Decoder(LoadSnapshot).decode
        self.epoch = secrets.randbits(63) | 1

    def _stores(self, r: _Region) -> tuple[Any, Any]:
        """(words, bytes) publish() stores into: the mapping itself, one aligned store per word."""
        return r.q, r.mm

    def _claim(self) -> None:
        r = self._region
        st = os.fstat(r.fd)
        key = (st.st_dev, st.st_ino, self.dp_rank)
        lock_at = r.slots_off + self.dp_rank * r.slot_size
        if key in _OWNED:
            r.close()
            raise RegionError(f"{self.path}: dp_rank {self.dp_rank} already has a publisher in this "
                              "process; one writer per rank")
        try:
            _lock_byte(r.fd, lock_at)
        except OSError as e:
            r.close()
            raise RegionError(f"{self.path}: dp_rank {self.dp_rank} is already published by another "
                              "live process; one writer per rank (stop it first)") from e
        _OWNED.add(key)
        self._owned = key

    @property
    def seq(self) -> int:
        """Sequence of the last publish (0 before the first)."""
        return self._seq

    def publish(self, snapshot: LoadSnapshot, *, publish_time_ns: int | None = None) -> int:
        """Write snapshot into this rank's slot; return its sequence number.

        Raises ValueError, leaving the slot untouched, when the snapshot's
        dp_rank is not this publisher's, its encoding exceeds the slot, or a
        field breaks the schema's value rule (a negative number, NaN or
        infinity, an int beyond its protobuf type): the error names the field.
        publish_time_ns defaults to now (the relay passes its receive time).
        """
        if snapshot.dp_rank != self.dp_rank:
            raise ValueError(f"snapshot.dp_rank={snapshot.dp_rank} but this publisher owns "
                             f"dp_rank {self.dp_rank}")
        payload = self._encode(snapshot)
        size = len(payload)
        if size > self._capacity:
            raise ValueError(f"snapshot encodes to {size} bytes, more than the slot's payload "
                             f"capacity of {self._capacity} bytes ({self.path}); nothing written")
        try:
            self._check(payload)  # the readers' own decode: what they would refuse is refused here
        except _DECODE_ERRORS as e:
            raise ValueError(f"dp_rank {self.dp_rank}: snapshot field {schema.value_error(payload) or e} "
                             f"(no number in a snapshot may be negative, NaN or infinite); nothing "
                             f"written ({self.path})") from None
        n = self._seq + 1
        t = _time_ns() if publish_time_ns is None else publish_time_ns
        base = self._buffers[n & 1]
        q = self._q
        w = base >> 3
        q[w] = 2 * n + 1
        self._mm[base + BUFFER_HEADER:base + BUFFER_HEADER + size] = payload
        q[w + 1] = t
        q[w + 2] = size << 32 | _crc32(payload, (n * _CRC_MUL ^ t) & 0xFFFFFFFF)
        q[w] = 2 * n
        q[self._seq_index] = n
        self._seq = n
        return n

    def maybe_publish(self, build: Callable[[], LoadSnapshot]) -> bool:
        """Call build() and publish its snapshot on every interval-th call; True if it did."""
        self._calls += 1
        if self._calls < self.interval:
            return False
        self._calls = 0
        self.publish(build())
        return True

    def mapping_intact(self) -> bool:
        """False when the region file was truncated below this publisher's mapping (one fstat).

        Writing a truncated mapping raises SIGBUS. An engine's publish path never
        calls this (no syscalls there). The relay's collector, which writes on
        behalf of remote ranks inside the server with a PwritePublisher (which
        never faults), checks before each write to notice a truncated file early.
        """
        try:
            return os.fstat(self._region.fd).st_size >= len(self._region.mm)
        except OSError:
            return False

    def close(self) -> None:
        if self._region is None:
            return
        self._q = self._mm = None
        if self._owned is not None:
            _OWNED.discard(self._owned)
        self._region.close()  # closing the fd drops the lock
        self._region = None  # type: ignore[assignment]


class _FileWords:
    """The region file as 8-byte words, read with pread and written with pwrite."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def __getitem__(self, index: int) -> int:
        data = os.pread(self.fd, 8, 8 * index)
        if len(data) != 8:
            raise RegionError(f"{self.path}: region file truncated (word {index} is past its end)")
        return int(_WORD.unpack(data)[0])

    def __setitem__(self, index: int, value: int) -> None:
        os.pwrite(self.fd, _WORD.pack(value), 8 * index)


class _FileBytes:
    """The region file as bytes for slice assignment, written with pwrite."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __setitem__(self, where: slice, data: bytes) -> None:
        os.pwrite(self.fd, data, where.start)


class PwritePublisher(ShmPublisher):
    """A ShmPublisher that writes with pwrite, never through the mapping: for the collector in serve.

    An engine's ShmPublisher stores into the mapping (no syscall per publish;
    one aligned 8-byte store per word). If the file is truncated under it, its
    next store raises SIGBUS and the engine dies: a local process able to write
    the file can kill its own publishers, which it could do anyway. The
    collector writes remote ranks from inside `loadsvc serve`, which must
    survive that, so it writes with pwrite: into a truncated file pwrite never
    faults (it writes past the end, in a file that no reader accepts any more).
    A word written with pwrite is copied by the kernel, so a concurrent reader
    may see it torn; readers already treat a state or sequence word that does
    not match as a torn read (and the checksum is bound to the sequence), so a
    torn word costs a retry, never a wrong snapshot. About 5 syscalls per publish.
    """

    def _stores(self, r: _Region) -> tuple[Any, Any]:
        return _FileWords(r.fd, self.path), _FileBytes(r.fd)


class ShmReader(Closing):
    """The read side: lock-free reads with a decode cache per (rank, sequence).

    ``ShmReader(path)`` takes dp_size from the header and raises RegionError
    when the file is missing or invalid. ``read(rank)`` returns the rank's
    latest snapshot, with ``seq`` and ``publish_time_ns`` filled in, or None
    when it was never published (or has never been read intact).
    ``read_all()`` returns the published ranks in ascending order; when no
    rank changed it costs one copy and one comparison of the sequence words.
    Changed ranks are read in C where loadsvc.core._shmfast was built (``native``),
    else in Python; ``native=False`` asks for Python. Both give the same results.

    Reads never touch the mapping unguarded: where loadsvc.core._shmfast was built
    they copy out of it in C under a SIGBUS guard (no syscall), else they read
    the file with os.pread. A file truncated under the reader (by anyone who
    may write it) therefore makes ``read``, ``read_all`` and ``sequences``
    raise RegionError, never kill the process; open a new reader once the
    region is valid again (the server's store does that by itself).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 stale_after: float = DEFAULT_STALE_AFTER,
                 unreachable_after: float = DEFAULT_UNREACHABLE_AFTER,
                 native: bool = True) -> None:
        self.path = Path(path) if path is not None else default_path()
        # native=False keeps read_all in Python even where loadsvc.core._shmfast was built.
        self._read_changed = _native_read_changed if native else None
        self.stale_after = stale_after
        self.unreachable_after = unreachable_after
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise RegionError(f"{self.path}: no region file (has any publisher or `loadsvc serve "
                              "--dp-size N` started?)") from None
        except OSError as e:  # EACCES, ENOTDIR, ...: say which file and why
            raise RegionError(f"cannot open region {self.path} for reading: {e.strerror}; check "
                              "the path and the file's owner and mode") from e
        try:
            self._region = _Region(self.path, fd, writable=False)
        except BaseException:
            os.close(fd)
            raise
        r = self._region
        self.dp_size = r.slot_count
        self.payload_capacity = r.payload_capacity
        self._mm = r.mm
        # (source, length, offset) -> bytes, short when the file is shorter now:
        # a SIGBUS-guarded copy out of the mapping, or os.pread on the file.
        if self._read_changed is not None and _native_copy is not None and _install_guard is not None:
            _install_guard()  # on top again if something (faulthandler) replaced it since import
            self._pread: Callable[[Any, int, int], bytes] = _native_copy
            self._src: Any = r.mm
        else:
            self._pread, self._src = os.pread, fd
        self._seq_off = r.seq_off
        self._seq_bytes = (r.seq_off, r.seq_off + 8 * r.slot_count)
        self._decode = msgspec.msgpack.Decoder(LoadSnapshot).decode
        self._cache: list[LoadSnapshot | None] = [None] * self.dp_size  # last good snapshot per rank
        self._cache_seq = [0] * self.dp_size
        self._slots_off = r.slots_off
        self._slot_size = r.slot_size
        self._seq_struct = struct.Struct(f"<{self.dp_size}Q")
        # Offset of buffer (n & 1) of rank r at index 2 * r + (n & 1).
        self._buffers = [r.buffer_offset(rank, i) for rank in range(self.dp_size) for i in (0, 1)]
        self._all_key: bytes | None = None
        self._all: list[LoadSnapshot] = []
        self.torn_retries = 0  # buffer changed or checksum failed during a copy
        self.unavailable = 0  # reads that gave up after READ_RETRIES
        self.corrupt = 0  # reads of an intact-checksum payload that failed to decode or named another
        # rank: the slot is tried again on every read (a rewrite in place at the same seq must be
        # read), so one bad publish counts once per read until it is replaced
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)

    def read(self, rank: int) -> LoadSnapshot | None:
        """The latest snapshot of rank (None if never published); raises IndexError if out of range.

        RegionError when the file was truncated under the reader.
        """
        if not 0 <= rank < self.dp_size:
            raise IndexError(f"dp_rank {rank} out of range 0..{self.dp_size - 1} ({self.path})")
        (n,) = _WORD.unpack(self._copy(self._seq_off + 8 * rank, 8))
        if n == self._cache_seq[rank]:
            return self._cache[rank]
        return self._refresh(rank, n)

    def _copy(self, offset: int, length: int) -> bytes:
        """length bytes of the region at offset; RegionError when the file is shorter now."""
        try:
            data = self._pread(self._src, length, offset)
        except OSError as e:
            raise RegionError(f"{self.path}: cannot read the region: {e.strerror}") from e
        if len(data) != length:
            raise self._truncated()
        return data

    def _truncated(self) -> RegionError:
        return RegionError(f"{self.path}: region file truncated under this reader (it shrank below "
                           "the size its header describes); open a new reader once it is valid again")

    def _refresh(self, rank: int, n: int) -> LoadSnapshot | None:
        # The slow path (retries, counting) for a rank that changed.
        copy = self._copy
        slot = self._slots_off + rank * self._slot_size
        half = self._slot_size >> 1
        for _ in range(READ_RETRIES):
            if n == 0:
                return self._cache[rank]
            base = slot + (n & 1) * half
            head = copy(base, _BUFFER_STATE.size)
            state, t, lc = _BUFFER_STATE.unpack(head)
            if state == 2 * n and (lc >> 32) <= self.payload_capacity:
                data = copy(base + BUFFER_HEADER, lc >> 32)
                if (copy(base, 8) == head[:8]
                        and _crc32(data, (n * _CRC_MUL ^ t) & 0xFFFFFFFF) == lc & 0xFFFFFFFF):
                    try:
                        snap = self._decode(data)
                    except _DECODE_ERRORS:
                        snap = None
                    if snap is None or snap.dp_rank != rank:
                        self.corrupt += 1
                        return self._cache[rank]
                    snap.seq = n
                    snap.publish_time_ns = t
                    self._cache[rank] = snap
                    self._cache_seq[rank] = n
                    return snap
            self.torn_retries += 1
            (n,) = _WORD.unpack(copy(self._seq_off + 8 * rank, 8))
            if n == self._cache_seq[rank]:
                return self._cache[rank]
        self.unavailable += 1
        return self._cache[rank]

    def read_all(self) -> list[LoadSnapshot]:
        """Snapshots of every published rank, ascending rank; cheap when nothing changed.

        RegionError when the file was truncated under the reader.
        """
        a, b = self._seq_bytes
        try:
            key = self._pread(self._src, b - a, a)
        except OSError:
            key = b""
        if key == self._all_key:  # never a short key: _all_key is a full one or None
            return self._all
        if len(key) != b - a:
            raise self._truncated()
        seqs = self._seq_struct.unpack(key)
        cache, cache_seq = self._cache, self._cache_seq
        if self._read_changed is not None:
            slow = self._read_changed(self._mm, seqs, cache, cache_seq, self._buffers,
                                      self.payload_capacity, self._decode)
            if slow is None:  # SIGBUS caught in C: the file shrank under the mapping
                raise self._truncated()
            for rank in slow:
                self._refresh(rank, seqs[rank])
        else:
            self._read_changed_python(seqs)
        # (the cast: no None left in cache on the first branch)
        self._all = out = (cast(list[LoadSnapshot], cache.copy()) if None not in cache
                           else [s for s in cache if s is not None])
        # Remember the key only when every rank was read at that sequence, so a
        # rank that could not be read intact is retried on the next call.
        self._all_key = key if list(seqs) == cache_seq else None
        return out

    def _read_changed_python(self, seqs: tuple[int, ...]) -> None:
        cache, cache_seq = self._cache, self._cache_seq
        # The first attempt of _refresh, inlined with every name local (this loop
        # runs for each changed rank); anything unusual (a payload longer than the
        # first read, a short read) falls back to _refresh, which retries, counts,
        # and raises RegionError when the file shrank. Two reads per rank: the
        # buffer with its payload, then its state word again.
        pread, src, buffers = self._pread, self._src, self._buffers
        first = BUFFER_HEADER + min(self.payload_capacity, _FIRST_READ)
        fits = first - BUFFER_HEADER
        unpack, decode, crc32 = _BUFFER_STATE.unpack_from, self._decode, _crc32
        rank = -1
        for n in seqs:
            rank += 1
            if n == cache_seq[rank]:
                continue
            base = buffers[2 * rank + (n & 1)]
            block = pread(src, first, base)
            if len(block) != first:
                self._refresh(rank, n)
                continue
            state, t, lc = unpack(block)
            if state == 2 * n and (lc >> 32) <= fits:
                data = block[BUFFER_HEADER:BUFFER_HEADER + (lc >> 32)]
                if (pread(src, 8, base) == block[:8]
                        and crc32(data, (n * _CRC_MUL ^ t) & 0xFFFFFFFF) == lc & 0xFFFFFFFF):
                    try:
                        snap = decode(data)
                    except _DECODE_ERRORS:
                        snap = None
                    if snap is not None and snap.dp_rank == rank:
                        snap.seq = n
                        snap.publish_time_ns = t
                        cache[rank] = snap
                        cache_seq[rank] = n
                        continue
            self._refresh(rank, n)

    @property
    def native(self) -> bool:
        """True when read_all's changed-rank loop runs in C (loadsvc.core._shmfast)."""
        return self._read_changed is not None

    def sequences(self) -> list[int]:
        """The sequence word of every rank (0 = never published); RegionError if truncated."""
        a, b = self._seq_bytes
        return list(self._seq_struct.unpack(self._copy(a, b - a)))

    def freshness(self, snapshot: LoadSnapshot | None, now_ns: int | None = None) -> tuple[Status, float]:
        """(Status, age_ms) of a snapshot under this reader's stale/unreachable bounds."""
        return freshness(snapshot.publish_time_ns if snapshot is not None else 0,
                         now_ns if now_ns is not None else time.time_ns(),
                         self.stale_after, self.unreachable_after)

    def region_replaced(self) -> bool:
        """True when the path no longer names the file this reader mapped (removed or recreated).

        A syscall; call it from a periodic check, not on every read.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        if (st.st_dev, st.st_ino) != self._identity:
            return True
        return st.st_size < len(self._region.mm)  # mmap.size() is the file's size now, not the mapping's

    def mapping_intact(self) -> bool:
        """False when the mapped file was truncated below the mapping (one fstat).

        A hint only: the file can shrink right after the check. Reads do not
        depend on it (they raise RegionError on a truncated file, never SIGBUS).
        """
        try:
            # len(mm), the mapped length: mmap.size() fstat()s the file, so it shrinks with it.
            return os.fstat(self._region.fd).st_size >= len(self._region.mm)
        except OSError:
            return False

    def close(self) -> None:
        if self._region is None:
            return
        self._mm = self._src = None  # type: ignore[assignment]
        self._region.close()
        self._region = None  # type: ignore[assignment]
