"""Files that appear whole or not at all: written under a temporary name beside their path, then renamed."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (so the rename stays on one file system) for the caller to
    write; on success rename it onto ``path`` in one step, on any error delete it. A reader, or a later run
    that merges into the file, finds the old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
