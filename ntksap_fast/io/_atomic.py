"""Atomic file writes with the permissions a plain ``open(path, "wb")`` would give.

``atomic_write(path)`` hands out a binary file on a temporary name in ``path``'s folder; on leaving the
block the data is flushed to disk (``fsync``), the file renamed over ``path`` (``os.replace``, atomic
on POSIX and Windows) and the folder synced, so a crash or an error leaves either the old file or the
new one at ``path``, and no temporary file behind.

Permissions: a new file gets ``0o666`` less the umask, as ``open()`` gives. The temporary file is
created with ``os.open(..., 0o666)`` and the kernel applies the umask (and a folder's default ACL)
itself, so the umask is never read: reading it means setting it and setting it back (``os.umask`` is
process-wide), which races with other threads creating files. (``tempfile.mkstemp`` makes 0600
files, which survived the rename: masks others on a shared folder could not read.) Writing over an
existing file keeps that file's permission bits, as ``open()`` does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["atomic_write"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temporary(folder: str, name: str) -> tuple[int, str]:
    """``(fd, path)`` of a new, empty file ``.<name>.<random>.tmp`` in ``folder``, mode 0o666 less the umask."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name!r} in {folder!r}")


def _fsync_folder(folder: str) -> None:
    """Syncs ``folder``'s entries (the rename) to disk where the platform allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows, or a folder that cannot be opened for reading
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose content replaces ``path`` atomically when the block ends without error."""
    target = os.fspath(path)
    folder = os.path.dirname(target) or "."
    fd, tmp = _create_temporary(folder, os.path.basename(target))
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, os.stat(target).st_mode & 0o777)  # open() keeps an existing file's mode
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
