"""Every file the project writes goes through ``atomic_write``: a temp file in the destination's own directory, flushed
and fsynced, ``os.replace``d onto the target, then the directory fsynced. On any POSIX filesystem the target is then
either the old complete file or the new complete file, whatever kills the process and whenever. A full disk, a quota
or a read-only place (ENOSPC, EDQUOT, EROFS) becomes a ``DiskFull`` (a ConfigError: one line, exit 2) that names the
path, what was written and how much room it needed; the temp file is removed and the target keeps its old content.

Temp files are named ``.<name>.ddpm-tmp-<host>-<pid>-<random>``, so that no two processes anywhere collide on a
shared filesystem, and the writer holds an exclusive lock (flock) on its temp file until it is in place:
``remove_leftovers`` takes only the temp files it can lock, which no live writer holds, whatever host or container
(PID namespace) it runs in. Where the filesystem has no working locks, only temp files older than STALE_AFTER_S are
taken. A run dir is owned by one training at a time (``own_run_dir``)."""

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from ddpm_lightning.errors import ConfigError

log = logging.getLogger(__name__)

TMP_MARK = ".ddpm-tmp-"
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}  # a filesystem without working flock
NO_DIR_FSYNC = {errno.EINVAL, errno.EOPNOTSUPP}  # some network and FUSE filesystems refuse to fsync a directory
STALE_AFTER_S = 3600  # without locks: a temp file this old is a dead writer's (no write here lasts minutes)


class DiskFull(ConfigError):
    """A write that found no room (or a read-only filesystem): nothing was lost, free space and rerun."""


class _Taken(Exception):
    """A clean-up elsewhere took this temp file in the instant before its writer locked it."""


def temp_path(path: Path) -> Path:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    return path.with_name(f".{path.name}{TMP_MARK}{host}-{os.getpid()}-{secrets.token_hex(4)}")


def _lock(fd: int) -> bool | None:
    """An exclusive flock on ``fd`` without waiting: True when taken, False when another process holds it, None where
    the filesystem has no working locks (remove_leftovers' age rule applies there)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in NO_LOCKS:
            return None
        raise


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; a filesystem that cannot fsync a directory is skipped with a debug line, a real I/O
    error fails."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in NO_DIR_FSYNC:
            raise
        log.debug(f"the filesystem of {directory} cannot fsync a directory ({e.strerror}); the file itself was fsynced")
    finally:
        os.close(fd)


def no_room(e: OSError, path: Path, what: str, size: int | None, ours: bool = True) -> DiskFull:
    """The one-line error of a write that found no room at ``path`` (``ours``: written by atomic_write, so the old
    file is intact; else a library's write, such as the CSV log, which may be cut short)."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the filesystem is read-only",
    }[e.errno]
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    need = f"it needs {size / 1e6:.1f} MB, {free}" if size is not None else free
    kept = (
        "nothing was lost (the previous file, if any, is intact)"
        if ours
        else "the last checkpoint is intact (a library's own file, such as the CSV log, may be cut short)"
    )
    return DiskFull(
        f"cannot write {what} to {path}: {reason} ({need}); {kept}: free space or point the output elsewhere, then "
        "rerun (a training resumes from its last.ckpt)"
    )


def atomic_write(path: str | Path, write: Callable[[io.BytesIO], None], what: str = "a file") -> None:
    """Write ``path`` crash-safely: ``write(f)`` serialises into memory (as Lightning's own _atomic_save does), so the
    size is known; the bytes go to a temp file beside the target, which is fsynced and moved onto ``path``."""
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getbuffer()
    try:
        for attempt in (1, 2):
            try:
                return _write_locked(path, data, what)
            except _Taken:
                if attempt == 2:
                    raise OSError(errno.EAGAIN, f"a clean-up in {path.parent} took the temp file twice") from None
    finally:
        data.release()


def _write_locked(path: Path, data: memoryview, what: str) -> None:
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            if _lock(f.fileno()) is False:  # held until the file is in place (closed after os.replace)
                raise _Taken()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):  # never hide the first error
            tmp.unlink(missing_ok=True)
        if e.errno in NO_ROOM:
            raise no_room(e, path, what, len(data)) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
            reason = (
                "permission denied" if e.errno in (errno.EACCES, errno.EPERM) else "a file stands where a folder must"
            )
            raise ConfigError(
                f"cannot write {what} to {path}: {reason} ({e.strerror}: {e.filename}); nothing was lost: make the "
                "folder writable or point the output elsewhere, then rerun"
            ) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, what: str = "a file") -> None:
    atomic_write(path, lambda f: f.write(data), what)


def write_text(path: str | Path, text: str, what: str = "a text file") -> None:
    write_bytes(path, text.encode(), what)


def write_json(path: str | Path, value, what: str = "a JSON file") -> None:
    write_text(path, json.dumps(value, indent=1), what)


def write_csv(path: str | Path, rows: list[dict], fields: list[str], what: str = "a CSV table") -> None:
    import csv

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue(), what)


def append_line(path: str | Path, line: str, what: str = "a log") -> None:
    """The file with one more line, written whole (a log of a few lines: the old one stays complete if this fails)."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    write_text(path, old + line + "\n", what)


def save_torch(obj, path: str | Path, what: str = "a tensor file") -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), what)


def save_png(image, path: str | Path, what: str = "an image") -> None:
    """A uint8 (3, H, W) tensor as PNG."""
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(f, format="PNG"), what)


def save_figure(fig, path: str | Path, what: str = "a figure", **kwargs) -> None:
    """A matplotlib figure, in the format of the path's suffix."""
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:], **kwargs), what)


def load_or_none(path: Path, load: Callable[[Path], object], what: str):
    """A cache file's content, or None when it is absent, or unreadable (truncated, garbage, an old format): then one
    warning line, the file is removed, and the caller recomputes it. A cache is never fatal and never trusted."""
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as e:
        log.warning(
            f"{what} {path} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]}); recomputing it"
        )
        path.unlink(missing_ok=True)
        return None


def checkpoint_io():
    """Lightning's TorchCheckpointIO with crash-safe local writes (atomic_write: the temp file beside the checkpoint).

    Lightning's own ``_atomic_save`` stages the file in $TMPDIR through an fsspec transaction and commits it with
    shutil.move, which across filesystems (a node-local $TMPDIR, a run dir on NFS) is a copy that first truncates the
    previous checkpoint: a kill during it leaves a 0-byte last.ckpt (Lightning-AI/pytorch-lightning#21253). This
    class can go once Lightning's fix (#21744) has landed in the lightning versions pyproject.toml admits. Remote
    URLs (s3://, gs://, ...) keep Lightning's path."""
    import torch
    from fsspec.implementations.local import LocalFileSystem
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if not isinstance(get_filesystem(path), LocalFileSystem):
                return super().save_checkpoint(checkpoint, path, storage_options)
            atomic_write(path, lambda f: torch.save(checkpoint, f), "a checkpoint")

    return AtomicCheckpointIO()


def remove_leftovers(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the temp files (``.*.ddpm-tmp-*``) in ``directory`` (and below it, ``recursive``: only a dir the caller
    owns, such as a training's run dir) that no live writer holds: those this process can lock, or, on a
    filesystem without working locks, those older than STALE_AFTER_S. Returns what was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for tmp in (directory.rglob if recursive else directory.glob)(f".*{TMP_MARK}*"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:  # gone meanwhile (its writer put it in place), or not a file
            continue
        try:
            dead = _lock(fd)  # taken: no live writer holds it
            if dead is None:
                dead = time.time() - os.fstat(fd).st_mtime > STALE_AFTER_S
            if dead:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        finally:
            os.close(fd)
    if removed:
        log.info(f"removed {len(removed)} temp file(s) left by a killed run under {directory}")
    return removed


_owned: dict[Path, int] = {}  # run dir -> the fd whose lock this process holds until it exits


def own_run_dir(run_dir: str | Path) -> None:
    """Take the run dir for this training: an exclusive flock on ``<run_dir>/.run.lock``, held until the process
    exits (so a killed or requeued run frees it). A second training started on a run dir whose first still lives is
    refused in one line (two writers would interleave their logs, and the last one's weights would win)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _owned:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if _lock(fd) is False:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"run dir {run_dir} is in use by a training that is still running ({holder}); wait for it to end, or "
            "choose another run dir (hydra.run.dir=DIR)"
        )
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
    )
    _owned[run_dir] = fd


def writable_dir(path: str | Path) -> Path:
    """The output folder, created; an unwritable one fails before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file where a folder must be; move it away or choose another output dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_path(path / ".write_test")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output dir {path} is not writable ({e.strerror}); choose a writable one (hydra.run.dir=DIR, or out=DIR)"
        ) from None
    return path
