"""LevelDB's sorted string table: the container of a TensorFlow checkpoint's `.index` file.

A table is a sorted list of (key, value) byte strings, laid out as

    data block 1 .. data block N | metaindex block | index block | footer (48 bytes)

Every block is followed by a 5-byte trailer: its compression type (0 = none,
1 = Snappy) and the masked CRC-32C of the stored block plus that type byte. A block
stores its entries with keys prefix-compressed against the previous key,

    varint shared | varint non_shared | varint value_length | key[shared:] | value

and ends with the offsets of its "restart points" (entries stored with shared = 0)
as uint32s, then their count. The index block maps, for each data block, a key
>= its last key to the block's handle (varint offset, varint size). The footer holds
the metaindex and index handles, zero padding to 40 bytes and a fixed magic number.
"""
from __future__ import annotations

import struct
from pathlib import Path

from ..errors import FastGPTError
from .atomic import replace_file
from .crc32c import crc32c, mask, unmask

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY = 0, 1


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a little-endian base-128 varint at `pos`; returns (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf writes negative int64 as its 64-bit two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ---------------------------------------------------------------- reading
def read_table(path: str | Path) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of the table at `path`, in key order, checksums verified."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FastGPTError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return list(_entries(data))
    except (ValueError, IndexError, struct.error) as err:
        raise FastGPTError(f"{path}: not a valid table file ({err})") from None


def _entries(data: bytes):
    if len(data) < FOOTER_SIZE:
        raise ValueError(f"{len(data)} bytes is shorter than the {FOOTER_SIZE}-byte footer")
    footer = data[-FOOTER_SIZE:]
    if struct.unpack("<Q", footer[40:])[0] != MAGIC:
        raise ValueError("bad magic number in the footer")
    _metaindex_offset, pos = read_varint(footer, 0)
    _metaindex_size, pos = read_varint(footer, pos)
    index_offset, pos = read_varint(footer, pos)
    index_size, pos = read_varint(footer, pos)
    for _separator, handle in _block_entries(_read_block(data, index_offset, index_size)):
        offset, pos = read_varint(handle, 0)
        size, _ = read_varint(handle, pos)
        yield from _block_entries(_read_block(data, offset, size))


def _read_block(data: bytes, offset: int, size: int) -> bytes:
    end = offset + size
    if end + TRAILER_SIZE > len(data) - FOOTER_SIZE:
        raise ValueError(f"block at {offset}+{size} runs past the end of the file")
    compression = data[end]
    (stored,) = struct.unpack("<I", data[end + 1:end + TRAILER_SIZE])
    if unmask(stored) != crc32c(data[offset:end + 1]):
        raise ValueError(f"checksum mismatch in the block at byte {offset}")
    if compression == SNAPPY:
        return snappy_decompress(data[offset:end])
    if compression != NO_COMPRESSION:
        raise ValueError(f"block at byte {offset} uses unknown compression type {compression}")
    return data[offset:end]


def snappy_decompress(buf: bytes) -> bytes:
    """Decode raw Snappy (TensorFlow writes bundle indexes uncompressed, but other tables may not be).

    After a varint of the decoded length come elements whose tag's low 2 bits say:
    0 = a literal run, 1/2/3 = copy earlier output, with a 1-, 2- or 4-byte back offset.
    """
    size, pos = read_varint(buf, 0)
    out = bytearray()
    while pos < len(buf):
        tag, kind = buf[pos], buf[pos] & 3
        pos += 1
        if kind == 0:
            length = tag >> 2
            if length >= 60:  # the length - 1 follows in (length - 59) little-endian bytes
                extra = length - 59
                length = int.from_bytes(buf[pos:pos + extra], "little")
                pos += extra
            length += 1
            out += buf[pos:pos + length]
            pos += length
            continue
        if kind == 1:
            length, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | buf[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            length, offset = (tag >> 2) + 1, int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        if not 0 < offset <= len(out):
            raise ValueError("corrupt snappy data (copy before the start)")
        start = len(out) - offset
        if offset >= length:
            out += out[start:start + length]
        else:  # the copy overlaps the bytes it produces (a repeating pattern): byte by byte
            for i in range(length):
                out.append(out[start + i])
    if len(out) != size:
        raise ValueError("corrupt snappy data (wrong decoded length)")
    return bytes(out)


def _block_entries(block: bytes):
    (num_restarts,) = struct.unpack("<I", block[-4:])
    entries_end = len(block) - 4 - 4 * num_restarts
    if entries_end < 0:
        raise ValueError("block restart array is larger than the block")
    pos, key = 0, b""
    while pos < entries_end:
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        value_length, pos = read_varint(block, pos)
        if shared > len(key) or pos + non_shared + value_length > entries_end:
            raise ValueError("corrupt block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_length]
        pos += value_length


# ---------------------------------------------------------------- writing
def _build_block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            limit = min(len(previous), len(key))
            while shared < limit and previous[shared] == key[shared]:
                shared += 1
        out += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
        out += key[shared:] + value
        previous = key
    restarts = restarts or [0]  # an empty block still has one restart point
    out += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def write_table(path: str | Path, entries: list[tuple[bytes, bytes]], block_size: int = 4096,
                restart_interval: int = 16) -> None:
    """Write sorted, unique-keyed `entries` as an uncompressed table (atomically)."""
    keys = [key for key, _ in entries]
    if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
        raise ValueError("table keys must be unique and sorted")
    out, index = bytearray(), []

    def emit(block: bytes) -> bytes:
        handle = encode_varint(len(out)) + encode_varint(len(block))
        trailer = bytes([NO_COMPRESSION])
        out.extend(block + trailer + struct.pack("<I", mask(crc32c(block + trailer))))
        return handle

    pending, pending_bytes = [], 0
    for key, value in entries:
        pending.append((key, value))
        pending_bytes += len(key) + len(value) + 6
        if pending_bytes >= block_size:
            index.append((key, emit(_build_block(pending, restart_interval))))
            pending, pending_bytes = [], 0
    if pending:
        index.append((pending[-1][0], emit(_build_block(pending, restart_interval))))
    metaindex_handle = emit(_build_block([], restart_interval))
    index_handle = emit(_build_block(index, 1))
    footer = (metaindex_handle + index_handle).ljust(FOOTER_SIZE - 8, b"\0") + struct.pack("<Q", MAGIC)
    out += footer
    replace_file(path, lambda tmp: tmp.write_bytes(out))
