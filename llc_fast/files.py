"""Files written by llc_fast: atomically (complete or untouched), with the mode a user expects."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

PARTIAL_SUFFIX = ".llc_fast-partial"


def write_atomically(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write ``content`` (text or bytes) to ``path`` so that the file is either complete or untouched.

    The text goes to ``<path>.llc_fast-partial.<random>`` beside it first, then replaces ``path`` in one
    rename. The file gets the mode of the file it replaces, or that of a new file under the umask. A
    partial file left by a killed process of this machine is removed by the next write of that path.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    for stale in folder.glob(f"{glob_escape(path.name)}{PARTIAL_SUFFIX}.*"):
        pid = stale.name.rsplit(".", 1)[-1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}{PARTIAL_SUFFIX}.{os.getpid()}-", dir=folder)
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SavedAsJson:
    """``save(path)`` / ``load(path)`` for result types with ``to_dict()`` and ``from_dict(d)``: JSON, written
    atomically."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON, atomically: the file is either complete or untouched."""
        import json

        return write_atomically(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike):
        import json

        with open(path) as f:
            return cls.from_dict(json.load(f))
