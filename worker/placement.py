"""Where the Java client puts a keyed record: murmur2 of the key, modulo the partitions.

librdkafka's ``murmur2_random`` partitioner (the worker's producers use it) agrees; its
default, ``consistent_random`` (CRC32), and so confluent-kafka's, does not. The keyed
layout checks its input against this: a group's calls on two partitions would keep two
states of it.
"""

from __future__ import annotations

import struct
from typing import Final

_SEED: Final = 0x9747B28C
_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` as an unsigned 32-bit number (``Utils.murmur2``)."""
    length = len(data)
    h = _SEED ^ length
    end = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:end]):  # little-endian 32-bit words
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of ``partitions`` the Java client chooses for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
