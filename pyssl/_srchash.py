"""Hash of the extension's C++/CUDA sources.

setup.py embeds it into pyssl._C at build time; at import, a source checkout compares it with
csrc/ as it is now, so a stale extension gives a clear message instead of wrong behaviour.
Standalone on purpose: setup.py loads this file without importing pyssl.
"""
import hashlib
import os

SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def source_hash(csrc_dir: str):
    files = sorted(f for f in os.listdir(csrc_dir) if f.endswith(SUFFIXES))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        with open(os.path.join(csrc_dir, f), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]
