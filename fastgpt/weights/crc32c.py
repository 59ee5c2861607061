"""CRC-32C (Castagnoli), the checksum of TensorFlow checkpoints and of LevelDB tables.

No C extension is needed, because a CRC is linear over GF(2):

- the register after a 4-byte word depends only on (register XOR word), linearly, so
  one step is two lookups in 65536-entry tables (low and high 16 bits), not four
  byte-steps;
- a long buffer is cut into K equal chunks, and numpy advances all K registers side
  by side, one word column at a time, each chunk starting from register 0;
- the chunk results are folded in order: register(A + B) = shift(register(A)) XOR
  register_from_0(B), where `shift` (feeding |B| zero bytes) is again linear,
  tabulated once per chunk length from the images of the 32 basis registers.
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


_BYTE = _byte_table()
_BYTE_LIST = _BYTE.tolist()


def _feed_zero_bytes(registers: np.ndarray, count: int) -> np.ndarray:
    for _ in range(count):
        registers = _BYTE[registers & 0xFF] ^ (registers >> 8)
    return registers


# Register after one 4-byte word, as a function of x = register ^ word: LOW[x & 0xFFFF] ^ HIGH[x >> 16].
_HALVES = np.arange(65536, dtype=np.uint32)
_WORD_LOW = _feed_zero_bytes(_HALVES, 4)
_WORD_HIGH = _feed_zero_bytes(_HALVES << np.uint32(16), 4)
_LANES = 16384
_MIN_PARALLEL_BYTES = 4096


def _advance_serial(register: int, data: bytes) -> int:
    """The raw CRC register after `data`, one byte at a time (for short inputs and tails)."""
    table = _BYTE_LIST
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _advance_words(registers: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Advance K registers in parallel; row j of `columns` (L, K) holds word j of every chunk."""
    x = np.empty_like(registers)
    for row in columns:
        np.bitwise_xor(registers, row, out=x)
        registers = _WORD_LOW[x & 0xFFFF] ^ _WORD_HIGH[x >> 16]
    return registers


def _shift_tables(words: int) -> list[list[int]]:
    """Four byte-indexed tables of the linear map 'register after `words` zero words'."""
    basis = _advance_words(np.uint32(1) << np.arange(32, dtype=np.uint32), np.zeros((words, 32), np.uint32))
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8): the bits of each byte value
    return [np.bitwise_xor.reduce(np.where(bits, basis[8 * p:8 * p + 8], 0).astype(np.uint32), axis=1).tolist()
            for p in range(4)]


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of `data` (bytes-like or numpy array), continuing from an earlier result `crc` (0 to start)."""
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    register = crc ^ 0xFFFFFFFF
    if buf.size >= _MIN_PARALLEL_BYTES:
        lanes = min(_LANES, buf.size // 256)
        words = buf.size // (4 * lanes)  # per chunk
        body = buf[:lanes * words * 4].view("<u4").reshape(lanes, words)
        partial = _advance_words(np.zeros(lanes, np.uint32), body.T).tolist()  # each chunk from register 0
        t0, t1, t2, t3 = _shift_tables(words)
        for chunk_register in partial:
            register = (t0[register & 0xFF] ^ t1[(register >> 8) & 0xFF] ^ t2[(register >> 16) & 0xFF]
                        ^ t3[register >> 24] ^ chunk_register)
        buf = buf[lanes * words * 4:]
    return _advance_serial(register, buf.tobytes()) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB/TensorFlow store CRCs rotated and offset, so a CRC of data holding CRCs stays well mixed."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rotated = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF
