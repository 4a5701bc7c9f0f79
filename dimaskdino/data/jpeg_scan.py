"""Corrupt JPEG scan data, found before decoding.

libjpeg (DALI's CPU decoder, Pillow) only *warns* about damaged entropy-coded data ("Corrupt JPEG
data: 1383 extraneous bytes before marker 0xd9", "premature end of data segment") and returns an
image of garbage pixels, which training would silently learn from. The header check at load time
does not read the scan data; the loaders run this check on the bytes they read anyway, just before
decoding, and report and skip a file that fails it (native op `dimaskdino::jpeg_scan_check`: every
Huffman code of a baseline JPEG decoded; no dequantization or IDCT, so it costs a fraction of a decode).

Progressive and arithmetic-coded JPEGs are not checked (said once in the log).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dimaskdino import _extension

logger = logging.getLogger("dimaskdino.data")

_MESSAGES = {
    1: "corrupt JPEG data: premature end of the scan data",
    2: "corrupt JPEG data: bytes after the last block of the scan",
    3: "corrupt JPEG data: bad Huffman code",
    4: "corrupt JPEG data: missing or out-of-order restart marker",
    5: "corrupt JPEG structure (a segment, table or marker is malformed)",
}
_unchecked_reported = False


def is_jpeg(data: bytes | np.ndarray) -> bool:
    return len(data) >= 3 and bytes(data[:3]) == b"\xff\xd8\xff"


def jpeg_scan_problem(data: bytes | np.ndarray) -> str | None:
    """Why a JPEG file's scan data is corrupt, or None when it decodes cleanly (or is not a
    baseline JPEG, which is not checked)."""
    global _unchecked_reported
    error = _extension.load_error()
    if error is not None:
        raise RuntimeError(f"the JPEG scan check needs the native extension: {error}")
    array = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data,
                                 dtype=np.uint8)
    if not array.flags.writeable:  # torch.from_numpy wants a writable buffer (the op only reads)
        array = array.copy()
    result = torch.ops.dimaskdino.jpeg_scan_check(torch.from_numpy(array))
    if result == -1 and not _unchecked_reported:
        _unchecked_reported = True
        logger.info("data: progressive or arithmetic-coded JPEGs are decoded without the scan-data check")
    return _MESSAGES.get(result)
