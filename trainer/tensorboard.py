"""TensorBoard scalars written from the calling thread.

tensorboardX's `SummaryWriter` hands events to a daemon thread through a bounded queue. When
that thread dies (ENOSPC on a full disk), the queue fills and the next `add_scalar` -- or
`close()`, which queues a stop signal -- blocks forever: a run on a full disk hung instead of
failing. Here one `Event` per logged step is framed as a TFRecord, written and flushed in the
caller's thread, so an OS error is raised where the metrics are written and the run stops."""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

from tensorboardX.proto import event_pb2
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c


class EventWriter:
    """Appends scalar events to `<logdir>/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event holding every scalar of `step`; raises OSError when it cannot be written."""
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v))
                                 for k, v in values.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def _write(self, event: event_pb2.Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                         + struct.pack("<I", masked_crc32c(data)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an events file, checking each record's CRCs."""
    out = []
    with open(path, "rb") as f:
        while header := f.read(8):
            (length,) = struct.unpack("<Q", header)
            if struct.unpack("<I", f.read(4))[0] != masked_crc32c(header):
                raise ValueError(f"{path}: bad record length checksum")
            data = f.read(length)
            if struct.unpack("<I", f.read(4))[0] != masked_crc32c(data):
                raise ValueError(f"{path}: bad record checksum")
            event = event_pb2.Event.FromString(data)
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out
