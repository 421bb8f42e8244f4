"""Files written by llc_fast: atomically (complete or untouched), with the mode a user expects."""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

PARTIAL_SUFFIX = ".llc_fast-partial"
# A name given by the user that becomes part of a file name: letters and digits (of any script), spaces, _ - . + = ,
NAME_IN_FILE = re.compile(r"[\w .+=,-]+")
NAME_IN_FILE_CHARS = "letters, digits, spaces and the characters _ - . + = ,"


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


def check_name_for_file(name, what: str, where: str) -> None:
    """Refuse ``name`` (a ``what``, e.g. "component") where it becomes part of a file name (``where``, e.g.
    "DIR/step<step>_<name>.json") but cannot be one on every file system: not a string, empty, only dots, with a
    leading or trailing space, or with characters other than NAME_IN_FILE_CHARS (no "/", "\\", ":", NUL...)."""
    if isinstance(name, str) and NAME_IN_FILE.fullmatch(name) and name.strip(".") and name == name.strip():
        return
    safe = re.sub(r"[^\w .+=,-]", "_", str(name)).strip().strip(".") or "part1"
    raise ValueError(f"{what} name {name!r} cannot be part of a file name ({where}): use {NAME_IN_FILE_CHARS} only "
                     f"(not only dots, no leading or trailing space), e.g. {safe!r}")


def check_free_space(folder: str | os.PathLike, nbytes: int, what: str, advice: str, replaced=()) -> None:
    """Refuse, before anything is written, to write ``nbytes`` (``what``) to ``folder`` when its file system has
    less free space (plus the size of the files in ``replaced``, which the write frees); OSError ENOSPC naming
    both numbers, then ``advice``."""
    free = shutil.disk_usage(folder).free + sum(Path(p).stat().st_size for p in replaced if Path(p).is_file())
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"{what} need {_size(nbytes)} in {folder}, but its file system has {_size(free)} "
                                    f"free: {advice}")


def reserve(path: str | os.PathLike, offset: int, length: int) -> None:
    """Allocate bytes [offset, offset + length) of the existing file at ``path`` on disk now (posix_fallocate, or
    zeros written where the file system does not support it), so that writing them later through a memory map
    cannot meet a full disk, which kills the process with SIGBUS instead of raising an error."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), offset, length)
            return
        except AttributeError:  # no posix_fallocate on this system (macOS, Windows)
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        f.seek(offset)
        chunk = bytes(min(length, 16 * 2**20))
        for start in range(0, length, len(chunk) or 1):
            f.write(chunk[:min(len(chunk), length - start)])


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB ({nbytes} bytes)"


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
