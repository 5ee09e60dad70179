"""The cross-node path: engines on other nodes push snapshots over ZMQ into node 0's region.

The cross-node path: engines on other nodes push snapshots over ZMQ into node 0's region.

    node 1..k                                   node 0 (`loadsvc serve --collect tcp://0.0.0.0:5557`)
    ZmqPublisher(rank r)  --PUSH, CURVE-->  Collector (PULL, bind, own thread)
      publish(snapshot)                       validate: size, header, fingerprint, dp_size,
      one frame: header + msgpack             rank, decode, payload rank, epoch/seq
      only the latest kept while away             | valid          | invalid
                                                  v                v
                                      ShmPublisher(rank r).publish  counted per reason,
                                      (publish time = receive time) logged (rate limited)
                                                  v
                                      region -> LoadStore -> gRPC / REST (as local ranks)

    frame.py      the wire: one frame per publish (header + msgpack), ZMTP heartbeats
    keys.py       CURVE key pairs (`loadsvc keys gen`)
    publisher.py  ZmqPublisher: the engine side, PUSH, never blocks
    collector.py  Collector: the node-0 side, PULL; the ordering and epoch rules
"""

from loadsvc.relay.collector import REJECT_REASONS, Collector
from loadsvc.relay.frame import FRAME_HEADER, FRAME_MAGIC, FRAME_VERSION, encode_frame
from loadsvc.relay.keys import generate_keys
from loadsvc.relay.publisher import ZmqPublisher

__all__ = ["ZmqPublisher", "Collector", "generate_keys", "encode_frame", "REJECT_REASONS",
           "FRAME_HEADER", "FRAME_MAGIC", "FRAME_VERSION"]
