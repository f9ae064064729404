"""File writing shared by the passes that save tensors (adapters, compact sparse weights)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable

import torch

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # No procfs: umask can only be read by setting it. The temporary value is the strictest one, so a file another
    # thread creates in that instant is too private rather than too open.
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX); platforms that cannot open a directory skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory: nothing more to do
            os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomic(path: str | os.PathLike, prefix: str, write: Callable[[str], None]) -> None:
    """Have ``write`` fill a temp file beside ``path``, then rename it over ``path``: what every writer here shares.

    The file gets the mode a plain ``open(path, "w")`` would give it: an existing file's mode is kept, a new file
    gets ``0o666 & ~umask`` (not mkstemp's 0600). A symlink at ``path`` is written through: its target is replaced
    and the link kept. The data is fsynced before the rename and the directory after it, so after a power loss the
    name holds the old file or the complete new one. On any error, ``KeyboardInterrupt`` included, the temp file
    is removed and ``path`` is untouched.

    Args:
        path: the final file name (or a symlink to it).
        prefix: temp file name prefix, so a leftover says which writer it came from.
        write: writes the whole file at the temp path it is given.

    Example:
        >>> _replace_atomic("notes.txt", ".x-", lambda tmp: open(tmp, "w").write("hi"))
    """
    # realpath follows every link in the chain (and a dangling link to where its target would be)
    target = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str], prefix: str
) -> None:
    """Write safetensors to a temp file beside ``path``, then rename: a crash or a full disk never leaves a
    half-written file under the final name (readers see the old file or the new one).

    The file gets the mode a plain ``open(path, "w")`` would give it: an existing file's mode is kept, a new file
    gets ``0o666 & ~umask`` (not mkstemp's 0600). A symlink at ``path`` is written through: its target is replaced
    and the link kept. The data is fsynced before the rename and the directory after it, so after a power loss the
    name holds the old file or the complete new one.

    Args:
        tensors: name -> tensor; contiguous CPU tensors.
        path: the final file name (or a symlink to it).
        metadata: string header fields.
        prefix: temp file name prefix, so a leftover says which writer it came from.

    Example:
        >>> save_safetensors_atomic({"w": torch.zeros(2)}, "out.safetensors", {"format": "x"}, prefix=".x-")
    """
    from safetensors.torch import save_file

    _replace_atomic(path, prefix, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_text_atomic(text: str, path: str | os.PathLike, prefix: str) -> None:
    """Write a UTF-8 text file with the guarantees of :func:`save_safetensors_atomic` (temp file, mode, symlink
    written through, fsync, rename): readers see the old file or the complete new one.

    Args:
        text: the whole file.
        path: the final file name (or a symlink to it).
        prefix: temp file name prefix, so a leftover says which writer it came from.

    Example:
        >>> write_text_atomic('{"format": "x"}', "config.json", prefix=".x-")
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _replace_atomic(path, prefix, write)
