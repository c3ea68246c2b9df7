"""Image dimensions from a compressed frame's own header (JPEG, JPEG-LS, JPEG 2000).

Used to refuse a DICOM whose Rows x Columns disagree with its pixel data before any decoder
allocates what the header claims.
"""
from __future__ import annotations

import struct

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG or JPEG-LS SOF segment; None if no SOF is found."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _SOF_MARKERS and pos + 9 <= len(data):
            rows, cols = struct.unpack(">HH", data[pos + 5:pos + 9])
            return rows, cols
        if marker == 0xDA:  # start of scan without a frame header
            return None
        pos += 2 + length
    return None


def j2k_dimensions(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 codestream's SIZ segment (also inside a JP2 box wrapper)."""
    start = data.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0 or start + 22 > len(data):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[start + 8:start + 24])
    return ysiz - yosiz, xsiz - xosiz


def power_of_two_reduction(rows: int, columns: int, target: int) -> int:
    """Largest power of two r with min(rows, columns) / r still >= target (what JPEG 2000 decoding allows)."""
    reduction = 1
    while min(rows, columns) // (reduction * 2) >= target:
        reduction *= 2
    return reduction
