"""TensorBoard event files written without the tensorboard package: scalars and PNG images.

An event file is a sequence of TFRecords: a uint64 length, the masked CRC-32C of those 8 bytes,
the payload, and the masked CRC-32C of the payload (all little-endian). Each payload is an `Event`
protobuf (tensorflow/core/util/event.proto), encoded here by hand since it needs only five fields:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; Image image = 4; }
    Image   { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }

TensorBoard reads `simple_value` as a scalar and `image` as an image summary (its legacy forms,
which it still migrates on load), so `tensorboard --logdir <run>/tensorboard` shows both.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

FILE_VERSION = "brain.Event:2"
RGB_COLORSPACE = 3

# CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, the checksum TFRecord uses.
_CRC32C_POLYNOMIAL = 0x82F63B78
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (check value: crc32c(b"123456789") == 0xE3069283)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant, so that a CRC of data that
    itself contains CRCs is not degenerate."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def record(payload: bytes) -> bytes:
    """One TFRecord framing `payload`."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


# ---- protobuf wire format (only what Event needs) ----------------------------------------------

def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields encode negatives as ten-byte two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def scalar_value(tag: str, value: float) -> bytes:
    """A Summary.Value holding a float32 scalar."""
    return _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value)


def image_value(tag: str, image: Image.Image) -> bytes:
    """A Summary.Value holding `image` as an RGB PNG."""
    image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    encoded = (_int_field(1, image.height) + _int_field(2, image.width) + _int_field(3, RGB_COLORSPACE)
               + _length_delimited(4, buffer.getvalue()))
    return _length_delimited(1, tag.encode()) + _length_delimited(4, encoded)


def event(wall_time: float, step: int, *, values: Sequence[bytes] = (), file_version: str | None = None) -> bytes:
    """An Event: a file-version marker or a summary of encoded Summary.Values."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _int_field(2, step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if values:
        out += _length_delimited(5, b"".join(_length_delimited(1, value) for value in values))
    return out


# ---- the writer --------------------------------------------------------------------------------

class EventWriter:
    """Appends scalars and images to <log_dir>/events.out.tfevents.<time>.<host>, flushing each
    write so that a live TensorBoard (or a crashed run) sees everything logged so far."""

    def __init__(self, log_dir: Path | str):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stem = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        path, copy = self.log_dir / stem, 0
        while path.exists():  # two writers in the same second: TensorBoard reads every tfevents file
            copy += 1
            path = self.log_dir / f"{stem}.{copy}"
        self.path = path
        self._file = open(path, "xb")
        self._write(event(time.time(), 0, file_version=FILE_VERSION))

    def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        """One event with a scalar per tag, e.g. {"codec/loss": 0.1, "codec/lr": 1e-3}."""
        encoded = [scalar_value(tag, float(value)) for tag, value in values.items()]
        self._write(event(time.time() if wall_time is None else wall_time, step, values=encoded))

    def image(self, tag: str, step: int, image: Image.Image, wall_time: float | None = None) -> None:
        self._write(event(time.time() if wall_time is None else wall_time, step, values=[image_value(tag, image)]))

    def _write(self, payload: bytes) -> None:
        if self._file.closed:
            raise ValueError(f"the TensorBoard event file {self.path} is closed; create a new EventWriter")
        self._file.write(record(payload))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
