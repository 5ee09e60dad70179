"""The relay's wire: one frame per publish, and the ZMTP heartbeats both ends set.

Frame (one ZMQ message part, little-endian):

    offset  size  field
         0     3  magic b"LSR"
         3     1  frame version (1)
         4     4  dp_rank (uint32)   must equal the payload's dp_rank
         8     4  dp_size (uint32)   must equal the region's
        12     8  schema fingerprint (loadsvc.core.schema.SCHEMA_FINGERPRINT)
        20     8  epoch (uint64, random per ZmqPublisher instance, never 0)
        28     8  seq (uint64, 1, 2, ... per publisher)
        36     -  payload: msgpack of LoadSnapshot (array form, as in the region)

The payload's own ``epoch``, ``seq`` and ``publish_time_ns`` are not trusted:
the collector stamps the header's epoch, the region assigns its own sequence,
and the publish time is the collector's receive time, so a node whose clock is
skewed can make a rank look neither fresher nor older than it is.
"""

from __future__ import annotations

import struct

import zmq

from loadsvc.core import schema

__all__ = ["FRAME_MAGIC", "FRAME_VERSION", "FRAME_HEADER", "MAGIC_VERSION", "encode_frame",
           "set_heartbeats", "HEARTBEAT_IVL_MS", "HEARTBEAT_TIMEOUT_MS",
           "HANDSHAKE_FAILED_EVENTS"]

FRAME_MAGIC = b"LSR"
FRAME_VERSION = 1
# magic+version, dp_rank, dp_size, fingerprint, epoch, seq
FRAME_HEADER = struct.Struct("<4sIIQQQ")
MAGIC_VERSION = FRAME_MAGIC + bytes([FRAME_VERSION])
HEARTBEAT_IVL_MS = 1000  # ZMTP heartbeats: a dead peer is noticed within ~3 s
HEARTBEAT_TIMEOUT_MS = 3000
# The monitor events of a refused or failed handshake (publisher and collector alike).
HANDSHAKE_FAILED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def encode_frame(payload: bytes, *, dp_rank: int, dp_size: int, epoch: int, seq: int,
                 fingerprint: int = schema.SCHEMA_FINGERPRINT) -> bytes:
    """One relay frame: header + already encoded payload (tests build bad frames with it)."""
    return FRAME_HEADER.pack(MAGIC_VERSION, dp_rank, dp_size, fingerprint, epoch, seq) + payload


def set_heartbeats(sock: zmq.Socket[bytes]) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
