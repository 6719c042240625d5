"""Minimal PNG decoder (numpy + zlib) for non-interlaced grayscale images of bit depth 1, 2, 4 or 8.

It is enough for Omniglot (1-bit grayscale) without depending on Pillow. Example, with a 2x1
8-bit image built by hand:

>>> import struct, zlib
>>> def chunk(kind, data):
...     return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
>>> png = (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 8, 0, 0, 0, 0))
...        + chunk(b"IDAT", zlib.compress(bytes([0, 10, 200]))) + chunk(b"IEND", b""))
>>> decode_png(png)
array([[ 10, 200]], dtype=uint8)
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["PNG_SIGNATURE", "decode_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BIT_DEPTHS = (1, 2, 4, 8)


def decode_png(data: bytes) -> np.ndarray:
    """Decode a grayscale PNG to a uint8 array of shape (height, width), scaled to 0..255.

    Samples of depth d < 8 are scaled by 255 / (2**d - 1), so 1-bit images become 0/255.
    Raises ValueError for anything else than non-interlaced grayscale of depth 1, 2, 4 or 8, and
    for a truncated or corrupt file (bad signature, chunk CRC, zlib stream or data size).
    """
    width, height, depth, idat = _read_chunks(data)
    row_bytes = (width * depth + 7) // 8
    try:
        decompressor = zlib.decompressobj()
        raw = decompressor.decompress(idat)
    except zlib.error as e:
        raise ValueError(f"corrupt PNG: bad image data ({e})") from e
    if not decompressor.eof or len(raw) != height * (row_bytes + 1):
        raise ValueError(
            f"corrupt or truncated PNG: {len(raw)} bytes of image data, "
            f"expected {height * (row_bytes + 1)} for {width}x{height} at {depth} bits"
        )
    rows = _unfilter(np.frombuffer(raw, np.uint8).reshape(height, row_bytes + 1))
    if depth < 8:
        # Samples are packed most significant bits first; the last byte of a row may be padded.
        shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)
        rows = ((rows[:, :, None] >> shifts) & (2**depth - 1)).reshape(height, -1)[:, :width]
    return rows * np.uint8(255 // (2**depth - 1))  # a new array, so writable even at depth 8


def _read_chunks(data: bytes) -> tuple[int, int, int, bytes]:
    """Check signature, chunk CRCs and IHDR; return width, height, bit depth and joined IDAT data."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    pos, header, idat = 8, None, []
    while True:
        if pos + 12 > len(data) or pos + 12 + int.from_bytes(data[pos : pos + 4], "big") > len(data):
            raise ValueError("truncated PNG: the file ends before the IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        body = data[pos + 8 : end]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end : end + 4])[0]:
            raise ValueError(f"corrupt PNG: CRC mismatch in the {kind.decode('latin-1')} chunk at byte {pos}")
        pos = end + 4
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise ValueError("corrupt PNG: the first chunk is not a valid IHDR")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif not kind[0] & 0x20:  # an unknown critical chunk (upper-case first letter) must not be skipped
            raise ValueError(f"unsupported PNG: critical chunk {kind!r}")
    width, height, depth, color_type, compression, filter_method, interlace = header
    if color_type != 0 or depth not in _BIT_DEPTHS:
        raise ValueError(
            f"unsupported PNG: color type {color_type}, bit depth {depth} "
            f"(only grayscale, color type 0, with depth 1, 2, 4 or 8)"
        )
    if interlace != 0:
        raise ValueError("unsupported PNG: interlaced (Adam7) images are not supported")
    if compression != 0 or filter_method != 0 or width == 0 or height == 0:
        raise ValueError("corrupt PNG: invalid IHDR")
    return width, height, depth, b"".join(idat)


def _unfilter(rows: np.ndarray) -> np.ndarray:
    """Undo the per-row filters of `rows` (each row: filter type byte, then the filtered bytes).

    For grayscale of depth <= 8 the filter unit ("bytes per pixel") is 1 byte.
    """
    filters, data = rows[:, 0], rows[:, 1:]
    if not filters.any():  # the common case (Omniglot): no filtering at all
        return data
    if filters.max() > 4:
        raise ValueError(f"corrupt PNG: unknown row filter type {filters.max()}")
    out = np.empty_like(data)
    prev = np.zeros_like(data[0])
    for y, (kind, line) in enumerate(zip(filters.tolist(), data)):
        if kind == 0:
            out[y] = line
        elif kind == 1:  # Sub: running sum along the row, modulo 256
            out[y] = np.cumsum(line, dtype=np.uint8)
        elif kind == 2:  # Up
            out[y] = line + prev
        else:  # Average and Paeth depend on the decoded left neighbour, so go byte by byte
            out[y] = _unfilter_sequential(line.tolist(), prev.tolist(), paeth=kind == 4)
        prev = out[y]
    return out


def _unfilter_sequential(line: list[int], prev: list[int], paeth: bool) -> list[int]:
    """Undo the Average (paeth=False) or Paeth filter on one row, given the decoded row above."""
    out, left, up_left = [], 0, 0
    for value, up in zip(line, prev):
        if paeth:
            estimate = left + up - up_left
            d_left, d_up, d_up_left = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
            if d_left <= d_up and d_left <= d_up_left:
                predictor = left
            elif d_up <= d_up_left:
                predictor = up
            else:
                predictor = up_left
        else:
            predictor = (left + up) >> 1
        left, up_left = (value + predictor) & 0xFF, up
        out.append(left)
    return out
