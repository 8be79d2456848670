"""Every file the project writes goes through ``atomic_write``: a temp file in the destination's own directory, flushed
and fsynced, ``os.replace``d onto the target, then the directory fsynced. On any POSIX filesystem the target is then
either the old complete file or the new complete file, whatever kills the process and whenever. A full disk, a quota
or a read-only place (ENOSPC, EDQUOT, EROFS) becomes a ``DiskFull`` (a ConfigError: one line, exit 2) that names the
path, what was written and how much room it needed; the temp file is removed and the target keeps its old content.

Temp files are named ``.<name>.ddpm-tmp-<pid>`` so that ``remove_leftovers`` can recognise, at the next start in a
dir, those that a killed run left behind."""

import errno
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from ddpm_lightning.errors import ConfigError

log = logging.getLogger(__name__)

TMP_MARK = ".ddpm-tmp-"
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class DiskFull(ConfigError):
    """A write that found no room (or a read-only filesystem): nothing was lost, free space and rerun."""


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
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
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in NO_ROOM:
            raise no_room(e, path, what, len(data)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        data.release()


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


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Remove the temp files that a killed run left under ``directory`` (only ours: ``.*.ddpm-tmp-<pid>`` of a process
    that no longer runs); returns what was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for tmp in directory.rglob(f".*{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):  # a write in progress
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    if removed:
        log.info(f"removed {len(removed)} temp file(s) left by a killed run under {directory}")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writable_dir(path: str | Path) -> Path:
    """The output folder, created; an unwritable one fails before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output dir {path} is not writable ({e.strerror}); choose a writable one (hydra.run.dir=DIR, or out=DIR)"
        ) from None
    remove_leftovers(path)  # temp files of a run killed while writing here
    return path
