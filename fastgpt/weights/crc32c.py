"""CRC-32C (Castagnoli), the checksum of TensorFlow checkpoints and of LevelDB tables.

No C extension is needed: a CRC is a linear map over GF(2), so a long buffer is cut
into K equal chunks whose CRC registers numpy advances side by side, one byte
column at a time, and the K partial registers are then folded together in order.
Folding needs "the register after L more zero bytes", which is itself linear in
the register, so it is tabulated once per chunk length from 32 basis states.
"""
from __future__ import annotations

import numpy as np

_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reversed
_MASK_DELTA = 0xA282EAD8


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
_TABLE_LIST = _TABLE.tolist()
_MAX_LANES = 1 << 16
_MIN_LANE_BYTES = 64


def _advance_serial(register: int, data: bytes) -> int:
    """The raw CRC register after `data`, one byte at a time (for short inputs)."""
    table = _TABLE_LIST
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _advance_lanes(registers: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Advance K registers in parallel; row j of `columns` (L, K) holds byte j of every chunk."""
    for row in columns:
        registers = _TABLE[(registers ^ row) & 0xFF] ^ (registers >> 8)
    return registers


def _zero_shift_tables(length: int) -> list[list[int]]:
    """Four byte tables for the linear map 'register after `length` zero bytes'."""
    basis = _advance_lanes(np.uint32(1) << np.arange(32, dtype=np.uint32), np.zeros((length, 32), np.uint8))
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8): the bits of each byte value
    return [np.bitwise_xor.reduce(np.where(bits, basis[8 * p:8 * p + 8], 0).astype(np.uint32), axis=1).tolist()
            for p in range(4)]


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of `data` (bytes-like), continuing from an earlier result `crc` (0 to start)."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    register = crc ^ 0xFFFFFFFF
    lanes = min(_MAX_LANES, buf.size // _MIN_LANE_BYTES)
    if lanes >= 64:
        length = buf.size // lanes
        columns = np.ascontiguousarray(buf[:lanes * length].reshape(lanes, length).T)
        partial = _advance_lanes(np.zeros(lanes, np.uint32), columns).tolist()  # each chunk from register 0
        t0, t1, t2, t3 = _zero_shift_tables(length)
        for chunk_register in partial:
            # register(A + B) = shift_by_len(B)(register(A)) ^ register_from_zero(B)
            register = (t0[register & 0xFF] ^ t1[(register >> 8) & 0xFF] ^ t2[(register >> 16) & 0xFF]
                        ^ t3[register >> 24] ^ chunk_register)
        buf = buf[lanes * length:]
    return _advance_serial(register, buf.tobytes()) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB/TensorFlow store CRCs rotated and offset, so a CRC of data holding CRCs stays well mixed."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rotated = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF
