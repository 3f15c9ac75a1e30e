"""File names of thought videos, shared by the generators (the files backend looks sources up by them) and the
pipeline (which writes them): one module both import, so neither imports the other for it."""

from __future__ import annotations

import re
import zlib


def file_stem(uid: str) -> str:
    """A file name for ``uid``: the uid itself when it is made of ``[A-Za-z0-9._-]`` (and does not start with a dot),
    else a sanitised form plus 8 hex digits of its CRC-32, so different uids never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", uid).lstrip(".")[:120]
    if safe == uid and safe:
        return safe
    return f"{safe or 'sample'}-{zlib.crc32(uid.encode()):08x}"
