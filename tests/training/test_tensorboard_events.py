"""TensorBoard event files written without tensorboard: CRC-32C against published check values and a
bitwise reference, records and protobufs decoded by an independent reader, StageLog's scalars equal
to metrics.csv; and, when the tensorboard package happens to be installed, read by TensorBoard itself."""

from __future__ import annotations

import csv
import io
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentgen.training.progress import StageLog
from latentgen.training.tensorboard import EventWriter, crc32c, masked_crc32c


# ---- an independent reader ---------------------------------------------------------------------

def reference_crc32c(data: bytes) -> int:
    """CRC-32C bit by bit (no table): the definition the table-driven version must agree with."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def reference_masked(data: bytes) -> int:
    crc = reference_crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: Path) -> list[bytes]:
    """Every TFRecord payload of `path`, both CRCs checked."""
    data, offset, payloads = path.read_bytes(), 0, []
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        assert length_crc == reference_masked(header), f"length CRC mismatch at byte {offset}"
        payload = data[offset + 12:offset + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert payload_crc == reference_masked(payload), f"payload CRC mismatch at byte {offset}"
        payloads.append(payload)
        offset += 16 + length
    assert offset == len(data)
    return payloads


def parse_message(data: bytes) -> list[tuple[int, int, object]]:
    """Protobuf wire format -> [(field, wire_type, value)]: ints for varints, bytes otherwise."""
    fields, offset = [], 0

    def varint() -> int:
        nonlocal offset
        result = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while offset < len(data):
        key = varint()
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = varint()
        elif wire_type == 1:
            value, offset = data[offset:offset + 8], offset + 8
        elif wire_type == 2:
            length = varint()
            value, offset = data[offset:offset + length], offset + length
        elif wire_type == 5:
            value, offset = data[offset:offset + 4], offset + 4
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        fields.append((field, wire_type, value))
    return fields


def decode_event(payload: bytes) -> dict:
    """An Event as a dict: wall_time, step, file_version, scalars {tag: value}, images {tag: PIL image}."""
    event = {"scalars": {}, "images": {}, "step": 0}
    for field, wire_type, value in parse_message(payload):
        if field == 1:
            assert wire_type == 1
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2:
            assert wire_type == 0
            event["step"] = value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 5:
            for summary_field, _, summary_value in parse_message(value):
                assert summary_field == 1
                parts = {f: v for f, _, v in parse_message(summary_value)}
                tag = parts[1].decode()
                if 2 in parts:
                    event["scalars"][tag] = struct.unpack("<f", parts[2])[0]
                if 4 in parts:
                    image = {f: v for f, _, v in parse_message(parts[4])}
                    decoded = Image.open(io.BytesIO(image[4]))
                    assert (image[1], image[2], image[3]) == (decoded.height, decoded.width, 3)
                    event["images"][tag] = decoded
    return event


def read_events(path: Path) -> list[dict]:
    return [decode_event(payload) for payload in read_records(path)]


# ---- tests -------------------------------------------------------------------------------------

def test_crc32c_check_values_and_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"") == 0
    # iSCSI test vectors (RFC 3720, B.4).
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    generator = random.Random(0)
    for length in (1, 7, 64, 1000):
        data = bytes(generator.randrange(256) for _ in range(length))
        assert crc32c(data) == reference_crc32c(data)
        assert masked_crc32c(data) == reference_masked(data)


def test_scalars_and_images_round_trip(tmp_path):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    with EventWriter(tmp_path / "tb") as writer:
        writer.scalars(5, {"codec/loss": 0.25, "codec/lr": 1e-3})
        writer.scalars(10, {"codec/loss": 0.125, "codec/lr": 5e-4})
        writer.image("codec/reconstructions", 10, picture)
        writer.scalars(2**40, {"big/step": -3.5})
    (path,) = (tmp_path / "tb").iterdir()
    assert path.name.startswith("events.out.tfevents.") and path == writer.path
    events = read_events(path)
    assert events[0]["file_version"] == "brain.Event:2" and not events[0]["scalars"]
    assert [(e["step"], e["scalars"]) for e in events[1:3]] == [
        (5, {"codec/loss": 0.25, "codec/lr": np.float32(1e-3)}),
        (10, {"codec/loss": 0.125, "codec/lr": np.float32(5e-4)})]
    assert events[3]["step"] == 10 and np.array_equal(np.asarray(events[3]["images"]["codec/reconstructions"]),
                                                     np.asarray(picture))
    assert events[4]["step"] == 2**40 and events[4]["scalars"] == {"big/step": -3.5}
    assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 600 for e in events)
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(11, {"x": 1.0})


def test_a_flipped_byte_is_caught_by_the_crc(tmp_path):
    with EventWriter(tmp_path) as writer:
        writer.scalars(1, {"loss": 1.0})
    data = bytearray(writer.path.read_bytes())
    data[-6] ^= 0x01  # inside the last payload
    writer.path.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="payload CRC mismatch"):
        read_records(writer.path)


def test_two_writers_in_one_directory_get_two_files(tmp_path):
    with EventWriter(tmp_path) as first, EventWriter(tmp_path) as second:
        first.scalars(1, {"a": 1.0})
        second.scalars(1, {"b": 2.0})
    assert first.path != second.path
    assert read_events(first.path)[1]["scalars"] == {"a": 1.0} and read_events(second.path)[1]["scalars"] == {"b": 2.0}


def test_stage_log_sends_every_csv_scalar_to_tensorboard(tmp_path):
    writer = EventWriter(tmp_path / "tensorboard")
    log = StageLog("stage 1: codec", 10, tmp_path, log_every=4, events=writer)
    for step in range(1, 11):
        log.step(step, {"loss": 1.0 / step, "l1": 0.5 / step}, lr=1e-3 * step)
    log.image("reconstructions", 10, Image.new("RGB", (8, 8), "red"))
    log.close()
    writer.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    events = [e for e in read_events(writer.path) if e["scalars"]]
    assert [int(row["step"]) for row in rows] == [e["step"] for e in events] == [4, 8, 10]
    for row, event in zip(rows, events):
        assert set(event["scalars"]) == {"codec/loss", "codec/l1", "codec/lr", "codec/it_per_s"}
        # metrics.csv keeps 6 significant digits of losses, 3 of lr and it/s; the events keep float32.
        for name, digits in (("loss", 6), ("l1", 6), ("lr", 3), ("it_per_s", 3)):
            assert event["scalars"][f"codec/{name}"] == pytest.approx(float(row[name]), rel=6 * 10.0**-digits), name
        assert event["scalars"]["codec/it_per_s"] > 0
    assert "codec/reconstructions" in read_events(writer.path)[-1]["images"]
    assert log.curve_path == tmp_path / "loss_codec.png" and Image.open(log.curve_path).size == (640, 400)


def test_tensorboard_itself_reads_the_file(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (it is optional)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with EventWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.scalars(step, {"denoiser/loss": 1.0 / step})
        writer.image("denoiser/samples", 3, Image.new("RGB", (10, 6), "blue"))
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    assert [(s.step, s.value) for s in accumulator.Scalars("denoiser/loss")] == [
        (1, 1.0), (2, pytest.approx(0.5)), (3, pytest.approx(1 / 3))]
    (image,) = accumulator.Images("denoiser/samples")
    assert (image.step, image.width, image.height) == (3, 10, 6)
