"""TensorFlow's checkpoint format ("tensor bundle"), read and written without TensorFlow.

A checkpoint with prefix P is two kinds of file:

- `P.index`: a LevelDB table (see `sstable`). The empty key holds a `BundleHeaderProto`
  (number of data shards, endianness, format version); every other key is a
  variable name whose value is a `BundleEntryProto`: dtype, shape, data shard,
  byte offset and size in that shard, and the masked CRC-32C of those bytes.
- `P.data-0000i-of-0000n`: the raw tensor bytes, back to back.

Only the handful of protobuf fields needed here are decoded, straight from the
wire format: each field is a varint key (field_number << 3 | wire_type) followed
by a varint (type 0), 8 bytes (1), a length-prefixed byte string (2) or 4 bytes (5).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FastGPTError
from .atomic import replace_file
from .crc32c import crc32c, mask, unmask
from .sstable import encode_varint, read_table, read_varint, write_table

HEADER_KEY = b""
BUNDLE_VERSION = 1  # the format version this reader implements (TensorFlow's kTensorBundleVersion)
LITTLE, BIG = 0, 1
# TensorFlow DataType enum values of the dtypes a checkpoint of weights may hold.
TF_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 9: torch.int64,
             14: torch.bfloat16, 19: torch.float16}
TORCH_TO_TF = {dtype: code for code, dtype in TF_DTYPES.items()}


@dataclass
class BundleEntry:
    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0  # masked
    sliced: bool = False  # a partitioned variable, stored as slices elsewhere


# ---------------------------------------------------------------- protobuf wire format
def _fields(buf: bytes):
    """Yield (field_number, value) pairs; value is an int or, for strings/messages, bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 1:
            (value,), pos = struct.unpack_from("<Q", buf, pos), pos + 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type == 5:
            (value,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _field(number: int, value) -> bytes:
    """Encode one field: int -> varint, bytes -> length-delimited. Zero/empty values are omitted (proto3)."""
    if isinstance(value, bytes):
        return encode_varint(number << 3 | 2) + encode_varint(len(value)) + value if value else b""
    return encode_varint(number << 3 | 0) + encode_varint(value) if value else b""


def parse_entry(buf: bytes) -> BundleEntry:
    entry, dims = BundleEntry(), []
    for number, value in _fields(buf):
        if number == 1:
            entry.dtype = value
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2; Dim: int64 size = 1
            for shape_field, dim in _fields(value):
                if shape_field == 2:
                    dims.append(next((_signed64(v) for f, v in _fields(dim) if f == 1), 0))
        elif number == 3:
            entry.shard_id = value
        elif number == 4:
            entry.offset = value
        elif number == 5:
            entry.size = value
        elif number == 6:
            entry.crc32c = value
        elif number == 7:
            entry.sliced = True
    entry.shape = tuple(dims)
    return entry


def encode_entry(entry: BundleEntry) -> bytes:
    # a zero-sized dim still needs its (empty) Dim message, so write it explicitly
    shape = b"".join(encode_varint(2 << 3 | 2) + encode_varint(len(dim)) + dim
                     for dim in (_field(1, d) for d in entry.shape))
    return (_field(1, entry.dtype) + _field(2, shape) + _field(3, entry.shard_id) + _field(4, entry.offset)
            + _field(5, entry.size) + encode_varint(6 << 3 | 5) + struct.pack("<I", entry.crc32c))


# ---------------------------------------------------------------- files
def data_filename(prefix: Path, shard: int, num_shards: int) -> Path:
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


def read_bundle(prefix: str | Path) -> dict[str, torch.Tensor]:
    """Every variable of the checkpoint at `prefix` (e.g. `dir/model.ckpt`), checksums verified."""
    prefix = Path(prefix)
    index = prefix.with_name(prefix.name + ".index")
    try:
        table = read_table(index)
        if not table or table[0][0] != HEADER_KEY:
            raise ValueError("the header entry (empty key) is missing")
        num_shards, endianness, min_consumer, bad_consumers = 1, LITTLE, 0, []
        for number, value in _fields(table[0][1]):
            if number == 1:
                num_shards = value
            elif number == 2:
                endianness = value
            elif number == 3:  # VersionDef
                for version_field, v in _fields(value):
                    if version_field == 2:
                        min_consumer = v
                    elif version_field == 3:
                        bad_consumers.append(v)
        entries = {key.decode("utf-8"): parse_entry(value) for key, value in table[1:]}
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise FastGPTError(f"{index}: not a valid TensorFlow checkpoint index ({err})") from None
    if min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in bad_consumers:
        raise FastGPTError(f"{index}: checkpoint format version needs a reader >= {min_consumer}; "
                           f"this reader implements version {BUNDLE_VERSION}")
    byte_order = "<" if endianness == LITTLE else ">"  # of the data file
    tensors, shards = {}, {}
    try:
        for name, entry in entries.items():
            tensors[name] = _read_tensor(prefix, num_shards, name, entry, byte_order, shards)
    finally:
        for handle in shards.values():
            handle.close()
    return tensors


def _read_tensor(prefix: Path, num_shards: int, name: str, entry: BundleEntry, byte_order: str,
                 shards: dict) -> torch.Tensor:
    if entry.sliced:
        raise FastGPTError(f"{prefix}: variable {name!r} is partitioned into slices, which is not supported")
    if entry.dtype not in TF_DTYPES:
        raise FastGPTError(f"{prefix}: variable {name!r} has TensorFlow dtype {entry.dtype}, which is not "
                           f"supported (supported: float32/64, float16, bfloat16, int32/64)")
    if not 0 <= entry.shard_id < num_shards or any(d < 0 for d in entry.shape):
        raise FastGPTError(f"{prefix}: variable {name!r} has an invalid shard id or shape")
    dtype = TF_DTYPES[entry.dtype]
    expected = int(np.prod(entry.shape)) * dtype.itemsize
    if entry.size != expected:
        raise FastGPTError(f"{prefix}: variable {name!r} holds {entry.size} bytes but shape "
                           f"{list(entry.shape)} of {dtype} needs {expected}")
    path = data_filename(prefix, entry.shard_id, num_shards)
    if entry.shard_id not in shards:
        try:
            shards[entry.shard_id] = open(path, "rb")
        except OSError as err:
            raise FastGPTError(f"{path}: cannot open checkpoint data ({err.strerror or err})") from None
    handle = shards[entry.shard_id]
    handle.seek(entry.offset)
    raw = bytearray(entry.size)
    if handle.readinto(raw) != entry.size:
        raise FastGPTError(f"{path}: truncated: variable {name!r} needs bytes {entry.offset}.."
                           f"{entry.offset + entry.size} but the file ends earlier")
    if crc32c(raw) != unmask(entry.crc32c):
        raise FastGPTError(f"{path}: checksum mismatch in variable {name!r} (corrupt data file)")
    if not raw:
        return torch.empty(entry.shape, dtype=dtype)
    if byte_order == ">" and dtype.itemsize > 1:
        np.frombuffer(raw, dtype=f"u{dtype.itemsize}").byteswap(inplace=True)
    return torch.frombuffer(raw, dtype=dtype).reshape(entry.shape)  # shares `raw`: no copy


def write_bundle(prefix: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as a single-shard little-endian checkpoint `prefix.index` + `prefix.data-00000-of-00001`."""
    prefix = Path(prefix)
    data_path = data_filename(prefix, 0, 1)
    entries = []

    def write_data(tmp: Path) -> None:
        offset = 0
        with open(tmp, "wb") as out:
            for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
                tensor = tensors[name].detach().cpu().contiguous()
                if tensor.dtype not in TORCH_TO_TF:
                    raise FastGPTError(f"variable {name!r}: dtype {tensor.dtype} cannot be written to a checkpoint")
                raw = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
                raw = raw.reshape(-1).view(np.uint8)
                out.write(raw.data)
                entry = BundleEntry(TORCH_TO_TF[tensor.dtype], tuple(tensor.shape), 0, offset, raw.size,
                                    mask(crc32c(raw)))
                entries.append((name.encode("utf-8"), encode_entry(entry)))
                offset += raw.size

    replace_file(data_path, write_data)
    version = _field(1, BUNDLE_VERSION)  # producer = 1, min_consumer = 0
    header = _field(1, 1) + _field(2, LITTLE) + _field(3, version)
    write_table(prefix.with_name(prefix.name + ".index"), [(HEADER_KEY, header)] + entries)
