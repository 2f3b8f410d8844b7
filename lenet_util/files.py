"""Write files whole or not at all, and only where a file belongs: a path that names a device,
a FIFO, a socket, a folder or a symbolic link is refused, never replaced."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from lenet_util.errors import LenetError


class OutputError(LenetError):
    """A path a file cannot be written to; the message names it and why."""


KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def not_a_file(path: str | Path) -> str | None:
    """What ``path`` is when it is not a regular file to read (following links): "nothing"
    (it does not exist), "a folder", "a character device", …; None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "nothing (no such file)" if not os.path.lexists(path) else "a broken link"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def check_output(path: str | Path) -> None:
    """:class:`OutputError` unless ``path`` names nothing yet or a regular file, and its folder
    exists (or can be made) and can be written to. Cheap: check output paths before a long
    computation whose result goes there."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({e.strerror or e})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next(name for test, name in KINDS if test(mode)) if any(
            test(mode) for test, _ in KINDS) else "not a regular file"
        hint = ("name the file it points to" if stat.S_ISLNK(mode)
                else "name a file to write")
        raise OutputError(f"{path}: {kind}, not a regular file; it is left as it is ({hint})")
    folder = path.parent
    while not folder.exists():
        if folder == folder.parent:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write there ({folder} is not a folder)")
    try:  # a real probe: permission bits say nothing to root, or of /proc
        os.rmdir(tempfile.mkdtemp(prefix=".lenet-probe-", dir=folder))
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({e.strerror or e})") from None


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or chunks of them written one after another) to ``path`` via a
    temporary file in the same folder, fsync and rename.

    A reader sees either the old file or the new one, never a partial write. Only a regular
    file (or nothing) at ``path`` is replaced: anything else is :class:`OutputError`
    (:func:`check_output`), as is a folder that cannot be made or written.
    """
    path = Path(path)
    check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write there ({e.strerror or e})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # what open() would have given, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        check_output(path)  # nothing else appeared there meanwhile
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
