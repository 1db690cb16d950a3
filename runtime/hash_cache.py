"""sha256 of large files, remembered across processes while the file is provably unchanged.

Checking a bundle hashes every file (``rexedge.runtime.bundle.load_bundle``): the 3B int4
bundle is 5.6 GB, ~14 s of hashing on the development CPU, paid at every load. A file whose
identity (device, inode) and size and whose modification and change times (ns) are those
recorded when it was last hashed is not re-read. The change time (ctime) cannot be set back by
a user (unlike mtime), so any write to the file since then forces a new hash. The record lives
in ``$REXEDGE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/rexedge``, i.e. ``~/.cache/rexedge``); when
it cannot be read or written the files are simply hashed, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_CHUNK = 1 << 22
_FILE = "file_hashes.json"
MAX_ENTRIES = 512   # files remembered; the oldest are forgotten first


def cache_dir() -> Path:
    explicit = os.environ.get("REXEDGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rexedge"


def sha256_file(path: Path) -> str:
    """sha256 of the file's bytes (always reads the file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCache:
    """Remembered hashes, read once; :meth:`save` writes what was added (atomically, best effort)."""

    def __init__(self) -> None:
        self._path = cache_dir() / _FILE
        try:
            entries = json.loads(self._path.read_text(encoding="utf-8"))
            self._entries: dict[str, list] = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            self._entries = {}
        self._changed = False

    def sha256(self, path: Path) -> str:
        key = str(path.resolve())
        identity = _identity(path)
        known = self._entries.get(key)
        if isinstance(known, list) and len(known) == 2 and known[0] == identity:
            return known[1]
        digest = sha256_file(path)
        if _identity(path) == identity:   # unchanged while it was read: safe to remember
            self._entries.pop(key, None)
            self._entries[key] = [identity, digest]
            self._changed = True
        return digest

    def save(self) -> None:
        if not self._changed:
            return
        entries = dict(list(self._entries.items())[-MAX_ENTRIES:])
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(dir=self._path.parent, prefix=_FILE, suffix=".partial")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entries, fh)
            os.replace(staging, self._path)
        except OSError:
            pass   # a read-only home: hashes are computed again next time
        self._changed = False
