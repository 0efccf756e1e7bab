"""A problem's identity by content, shared by the synthetic task (its training rows skip every
test problem), the benchmarks and `rft-data` (contamination checks). Imports nothing of posttrain."""

from __future__ import annotations

import hashlib
import unicodedata


def problem_key(text: str) -> str:
    """A problem's content hash: the same for texts that differ only in case, Unicode form or
    whitespace (sha256 of the text NFKC-normalised, case folded, every whitespace removed)."""
    normal = "".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha256(normal.encode()).hexdigest()
