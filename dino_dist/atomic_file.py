"""Small files that are whole or absent: written under a temporary name, then renamed.

`os.replace` is atomic within a filesystem, so a reader, or a crash mid-write, never finds
half a file under the final name. The temporary name starts with a dot and ends in `.tmp`
(what the run directory's readers skip) and holds the process id, so processes that write the
same file at once (ranks on one node, parallel tests filling one cache) never share it.

Checkpoints need more (fsync of the file and its folder): dino_dist.checkpoint.files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """`write(f)` fills the open binary file; a failed write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
