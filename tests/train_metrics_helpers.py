"""Metric records and how to read them back (TensorBoard events, an eventual upload), shared by
tests/unit/test_train_metrics.py and tests/integration/test_train_metrics.py."""
import time

from llava_core.config import TrainStageSettings

STAGE = TrainStageSettings(tracking="", metrics_sync_every=5)


def read_events(data: bytes):
    """TFRecord framing: length (8 bytes), its crc (4), the Event proto, its crc (4)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    at, out = 0, []
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        out.append(Event.FromString(data[at + 12:at + 12 + length]))
        at += 12 + length + 4
    return out


def records(steps) -> list[dict]:
    return [{"step": s, "loss": round(3.0 / s, 6), "lr": 1e-3, "grad_norm": 1.0, "mfu": None, "time": float(s)}
            for s in steps]


def eventually(read, expected, timeout=30.0):
    """Poll `read()` until it returns `expected` (uploads run in the background); the last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = read()
        except (OSError, ValueError):  # not there yet
            value = None
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.1)
