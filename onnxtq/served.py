"""What a file costs to send: brotli -q 11 (what web servers and CDNs send, and every browser decodes),
gzip -9, and onnxtq's own container (`onnxtq pack`), side by side in every report."""

from __future__ import annotations

import gzip

import brotli

from onnxtq import container

#: Largest file whose sizes as sent a report measures: brotli -q 11 runs at about 3 s/MB, so a language
#: model's file would spend most of the run here (`onnxtq pack` and a web server's brotli tell the size).
MEASURED_UP_TO = 32 * 2**20

#: The sizes as sent, in the order reports show them.
SENT = ("brotli", "gzip", "packed")


def brotli_bytes(data: bytes) -> int:
    """brotli at quality 11 with a 16 MB window (`brotli -q 11`)."""
    return len(brotli.compress(data, quality=11, lgwin=24))


def transfer_sizes(data: bytes) -> dict[str, int]:
    """The file's bytes after brotli -q 11, gzip -9 and `onnxtq pack` (rANS)."""
    packed, _ = container.pack(data)
    return {"brotli": brotli_bytes(data), "gzip": len(gzip.compress(data, 9, mtime=0)), "packed": len(packed)}
