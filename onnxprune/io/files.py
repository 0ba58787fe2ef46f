"""Atomic file replacement and output-path checks, shared by every writer (models, reports).

A written file appears complete or not at all: the content goes to a temporary file beside
the destination, which is renamed onto it once complete. The rename is only ever applied
to a regular file or to a free name: an output path that is a symlink, a device, a FIFO or
a folder is refused, because replacing it would write somewhere the user did not name
(through the link) or destroy what is there (a device node).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from onnxprune.errors import InputError

__all__ = ["atomic_path", "check_writable", "make_parent", "same_file", "sweep_stale",
           "NAME_MAX"]

NAME_MAX = 255  # bytes in one path component on every common file system


def check_writable(path: Path, what: str = "output") -> None:
    """Refuses an output path that is not a free name or a regular file (exit 2).

    A symlink is refused even when it points at a regular file: following it writes
    outside the path given, replacing it loses the link the user made.
    """
    if "\x00" in str(path):
        raise InputError(f"{what} path {path!r} contains a NUL byte; choose another name")
    if len(path.name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise InputError(f"{what} name {path.name[:40]}... is over {NAME_MAX} bytes; "
                         "choose a shorter name")
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise InputError(f"{path}: cannot check the {what} path ({e.strerror})") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise InputError(f"{path}: the {what} path is a symbolic link; give the real file "
                             "path (links are not written through or replaced)")
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{path}: is a folder; give a file name such as "
                             f"{path / 'model.onnx'}")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: the {what} path is not a regular file (a device, FIFO "
                             "or socket); give a file path")
    existing = next(p for p in (path.parent, *path.parent.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise InputError(f"{existing}: is not a folder; the {what} cannot be written under it")


def make_parent(path: Path) -> None:
    """Creates the missing folders above an output just before it is written (nothing is
    created by a run that fails earlier)."""
    path.parent.mkdir(parents=True, exist_ok=True)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two spellings name the same file: same inode, or the same resolved path
    (for names that do not exist yet)."""
    pa, pb = Path(a), Path(b)
    with contextlib.suppress(OSError):
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    try:
        return pa.resolve() == pb.resolve()
    except (OSError, RuntimeError):
        return os.path.abspath(pa) == os.path.abspath(pb)


def _temp_prefix(out: Path) -> str:
    return f".{out.name[:200]}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Removes temporary files a killed run left beside `out` (kill -9 runs no cleanup).

    Only names this module makes (`.<name>.<pid>.<random>.tmp`, the `.tmp.data` beside
    it, and the `..<that>.<random>` folder onnx_ir writes the data in) whose process no
    longer exists are removed; a running writer's files are left alone.
    """
    removed = []
    prefix = _temp_prefix(out)
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            name = entry.name
            folder = name.startswith("." + prefix) and ".tmp.data." in name
            rest = name[len(prefix) + (1 if folder else 0):]
            if not folder and not (name.startswith(prefix) and (
                    name.endswith(".tmp") or name.endswith(".tmp.data"))):
                continue
            pid = rest.split(".", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if folder and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                elif not folder and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                else:
                    continue
                removed.append(Path(entry.path))
    return removed


def _mode_for(path: Path) -> int:
    """The permissions a new file at `path` gets: the old file's, else 0o666 minus umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def fsync_path(path: Path) -> None:
    """Flushes a written file (or folder entry) to disk, so a rename publishes whole data."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(out: Path, what: str = "output") -> Iterator[Path]:
    """A temporary path beside `out`; renamed onto `out` only if the block succeeds.

    A failure (or Ctrl-C, or SIGTERM turned into an exception by the CLI) leaves `out` as
    it was and no temporary file behind. `out` must be a free name or a regular file.
    """
    out = Path(out)
    check_writable(out, what)
    sweep_stale(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f"{_temp_prefix(out)}{os.getpid()}.", suffix=".tmp",
                                    dir=out.parent)
    except OSError as e:
        raise InputError(f"{out.parent}: cannot write there ({e.strerror})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _mode_for(out))  # not mkstemp's private 0600
        yield tmp
        fsync_path(tmp)
        check_writable(out, what)  # it may have become a link while we wrote
        os.replace(tmp, out)
        fsync_path(out.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, InputError):
            raise
        raise InputError(f"{out}: cannot write the {what} ({e.strerror or e}); check the free "
                         "space, file size limit and permissions there") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
