"""Crash-safe writes (files.py) on two filesystems: the run dir on a tmpfs of its own, $TMPDIR on the root filesystem,
as on a cluster (shared run dir, node-local $TMPDIR). Kills during checkpoint saves, full disks, garbage caches."""

import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_cifar, natural_images, random_detector_state
from test_reliability import assert_same_training_state, load, train_cmd, wait_for

from ddpm_lightning import files, metrics


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path (skips where mounting is not permitted)."""
    mounted = []

    def mount(size: str, name: str = "fs") -> Path:
        point = tmp_path / name
        point.mkdir()
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True
        )
        if p.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here ({p.stderr.strip() or 'mount failed'}); CI runs as root, where it can"
            )
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the filesystem of ``folder`` until ``leave`` bytes are free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def interrupt(fd):
    raise KeyboardInterrupt


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    files.write_json(target, {"v": 1})

    def broken(f):
        f.write(b"half of a new file")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["results.json"]
    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):  # interrupted while the bytes go to disk
        files.write_bytes(target, b"new")
    assert json.loads(target.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["results.json"]


HOLD_A_WRITE = """import os, sys, time
from ddpm_lightning import files
sync = os.fsync
def slow_fsync(fd):  # the write's bytes are out; hold the temp file (and its lock) for a while
    print("writing", flush=True)
    time.sleep(float(sys.argv[2]))
    sync(fd)
os.fsync = slow_fsync
files.write_bytes(sys.argv[1], b"new content")
"""


def hold_a_write(python, target: Path, seconds: float) -> subprocess.Popen:
    """A live writer of ``target``, inside atomic_write with its temp file beside the target, for ``seconds``."""
    proc = subprocess.Popen([python, "-c", HOLD_A_WRITE, str(target), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    return proc


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP, errno.EIO])
def test_a_directory_fsync_the_filesystem_refuses_is_skipped_and_a_real_io_error_fails(
    tmp_path, monkeypatch, caplog, code
):
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "results.json"
    if code == errno.EIO:
        with pytest.raises(OSError, match="Input/output error"):
            files.write_json(target, {"v": 1})
        return
    with caplog.at_level("DEBUG", logger="ddpm_lightning.files"):
        files.write_json(target, {"v": 1})
    assert json.loads(target.read_text()) == {"v": 1} and "cannot fsync a directory" in caplog.text


def test_temp_files_are_unique_per_host_process_and_write(tmp_path):
    names = {files.temp_path(tmp_path / "last.ckpt").name for _ in range(100)}
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    assert len(names) == 100 and all(n.startswith(f".last.ckpt{files.TMP_MARK}{host}-{os.getpid()}-") for n in names)


def test_a_clean_up_takes_only_temp_files_no_live_writer_holds(python, tmp_path):
    """A killed writer's temp file (no lock: whatever its host and pid) is removed; a live writer's (locked) stays
    and is put in place; only in the given dir unless recursive; other files are never touched."""
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f".last.ckpt{files.TMP_MARK}another_host-4242-0badcafe"
    old_format = tmp_path / f".grid.png{files.TMP_MARK}123"  # the pid-only names of earlier versions
    other = tmp_path / ".not_ours.tmp"
    for p in (stale, old_format, other):
        p.write_bytes(b"x")
    writer = hold_a_write(python, tmp_path / "results.json", 30)
    live = next(tmp_path.glob(f".results.json{files.TMP_MARK}*"))
    assert files.remove_leftovers(tmp_path) == [old_format]  # not below the dir
    assert files.remove_leftovers(tmp_path, recursive=True) == [stale]
    assert live.exists() and other.exists()
    writer.kill()
    writer.wait()
    assert files.remove_leftovers(tmp_path) == [live]  # its writer is dead now


def test_without_working_locks_only_old_temp_files_are_taken(tmp_path, monkeypatch):
    young, old = (tmp_path / f".a{files.TMP_MARK}h-1-00000000", tmp_path / f".b{files.TMP_MARK}h-2-00000000")
    for p in (young, old):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - files.STALE_AFTER_S - 60,) * 2)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    assert files.remove_leftovers(tmp_path) == [old] and young.exists()
    files.write_bytes(tmp_path / "c.json", b"{}")  # writing needs no lock either
    assert (tmp_path / "c.json").read_bytes() == b"{}"


def test_a_live_writers_temp_file_survives_a_clean_up_from_another_pid_namespace(python, tmp_path):
    """As under srun or in containers that share a filesystem but not a pid space: the clean-up that train.py runs
    at start-up, run in a new PID namespace, where the writer's pid means nothing (a pid check removed its file)."""
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"unshare -p is not permitted here ({probe.stderr.strip()}); CI runs as root, where it is")
    run_dir = tmp_path / "run"
    writer = hold_a_write(python, run_dir / "checkpoints" / "last.ckpt", 8)
    temp = next((run_dir / "checkpoints").glob(f".last.ckpt{files.TMP_MARK}*"))
    clean_up = (
        "import sys; from ddpm_lightning import files; print(files.remove_leftovers(sys.argv[1], recursive=True))"
    )
    p = subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", python, "-c", clean_up, str(run_dir)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr[-2000:]
    assert temp.exists()
    assert writer.wait(timeout=120) == 0 and (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"new content"


def test_a_second_training_on_a_run_dir_in_use_is_refused_in_one_line(python, tmp_path):
    root = make_cifar(tmp_path / "cifar", n_train=20)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_cmd(python, root, run_dir, "trainer.max_epochs=1000"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: (run_dir / ".run.lock").is_file() and (run_dir / ".run.lock").read_text().startswith("pid"))
        p = subprocess.run(train_cmd(python, root, run_dir), capture_output=True, text=True, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
        assert lines[0].startswith(
            f"error: run dir {run_dir} is in use by a training that is still running (pid {first.pid}"
        )
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_a_full_disk_is_one_error_that_names_the_path_the_content_and_the_room(tmpfs):
    fs = tmpfs("1m")
    files.write_bytes(fs / "old.bin", b"old")
    fill(fs, leave=4096)
    with pytest.raises(
        files.DiskFull,
        match=r"cannot write a sample grid to .*old.bin: the disk is full \(it needs [0-9.]+ MB, "
        r"[0-9.]+ MB free\); nothing was lost",
    ):
        files.write_bytes(fs / "old.bin", b"\1" * 300_000, "a sample grid")
    assert (fs / "old.bin").read_bytes() == b"old" and sorted(os.listdir(fs)) == ["filler", "old.bin"]


@pytest.mark.slow  # 35 s of Inception features; load_or_none's rule is the same for every cache
def test_a_garbage_or_truncated_reference_cache_is_recomputed_with_one_warning(tmp_path, caplog):
    detector = metrics.Inception(random_detector_state(), "random")
    images = natural_images(24)
    key = dict(classes=["cat"], split="train", detector="random")
    first = metrics.reference_statistics(detector, images, key, tmp_path, batch_size=12)
    cache = next(tmp_path.glob("fid_stats_*.pt"))
    good = cache.read_bytes()
    for broken in (b"garbage", good[: len(good) // 2], b""):
        cache.write_bytes(broken)
        caplog.clear()
        again = metrics.reference_statistics(detector, images, key, tmp_path, batch_size=12)
        assert torch.equal(again["features"], first["features"]) and (again["mu"] == first["mu"]).all()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "is unreadable" in warnings[0] and "recomputing it" in warnings[0]
        assert torch.load(cache, weights_only=True)["features"].shape == (24, 2048)  # rewritten, whole
    floor = metrics.floor(
        detector,
        first,
        images[:8],
        8,
        dict(kid_subsets=5, kid_subset_size=4, bootstrap=0, seed=0, prc=False),
        tmp_path,
        8,
    )
    cached_floor = next(tmp_path.glob("floor_*.json"))
    cached_floor.write_text("{not json")
    assert metrics.floor(
        detector,
        first,
        images[:8],
        8,
        dict(kid_subsets=5, kid_subset_size=4, bootstrap=0, seed=0, prc=False),
        tmp_path,
        8,
    )["fid"] == pytest.approx(floor["fid"])


def big_train_cmd(python, root, run_dir, *extra):
    """The paper's U-Net (width 64: a 373 MB checkpoint with the EMA and Adam's moments) on 8 images: 2 steps an epoch."""
    return train_cmd(
        python,
        root,
        run_dir,
        "net=unet",
        "data.batch_size=4",
        "data.classes=[automobile,cat]",
        "trainer.max_epochs=4",
        "callbacks.sample_grid.n_per_class=1",
        "sampler.steps=2",
        *extra,
        net=(),
    )


def kill_during_save(python, cmd, run_dir: Path, save: int, delay: float, env: dict) -> None:
    """Start training and SIGKILL it ``delay`` s after the ``save``-th checkpoint write began: a temp file appeared
    beside last.ckpt (files.checkpoint_io) or in $TMPDIR (where Lightning's own writer stages it)."""
    ckpts, tmpdir = run_dir / "checkpoints", Path(env["TMPDIR"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    seen, writing = 0, False
    start = time.time()
    while proc.poll() is None and time.time() - start < 600:
        now = (ckpts.is_dir() and bool(list(ckpts.glob(f".last.ckpt{files.TMP_MARK}*")))) or any(
            p.is_file() for p in tmpdir.rglob("*")
        )
        if now and not writing:
            seen += 1
            if seen == save:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        writing = now
        time.sleep(0.002)
    proc.wait()
    assert seen == save, f"saw {seen} checkpoint writes, wanted to kill during write {save}"


def assert_killed_cleanly(run_dir: Path, tmpdir: Path) -> dict:
    last = run_dir / "checkpoints" / "last.ckpt"
    state = load(last)  # whole: the previous checkpoint, or the new one
    assert os.path.getsize(last) > 100e6
    orphans = [p for p in tmpdir.rglob("*") if p.is_file() and p.stat().st_size > 1e6]
    assert not orphans, orphans  # nothing staged in $TMPDIR
    return state


def two_filesystems(tmpfs, tmp_path):
    """A 2 GB tmpfs for the run dirs, 8 training images, and $TMPDIR on the root filesystem."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    return tmpfs("2g"), make_cifar(tmp_path / "cifar", n_train=4), tmpdir, {**os.environ, "TMPDIR": str(tmpdir)}


@pytest.mark.slow  # 32 s; the default suite keeps the SIGKILL resume of test_reliability and the full-disk saves
def test_a_sigkill_during_the_second_save_of_a_paper_width_checkpoint_leaves_one_that_loads(python, tmpfs, tmp_path):
    fs, root, tmpdir, env = two_filesystems(tmpfs, tmp_path)
    run_dir = fs / "run"
    kill_during_save(python, big_train_cmd(python, root, run_dir), run_dir, save=2, delay=0.05, env=env)
    state = assert_killed_cleanly(run_dir, tmpdir)
    assert state["global_step"] in (2, 4)  # the first epoch's checkpoint, or the second's
    p = subprocess.run(big_train_cmd(python, root, run_dir), capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout + p.stderr and load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert not list((run_dir / "checkpoints").glob(f".*{files.TMP_MARK}*"))  # the killed write's temp file was removed


@pytest.mark.slow  # about 4 minutes: seven kills of a 373 MB checkpoint write, each resumed to the end
def test_sigkills_at_many_points_of_the_saves_leave_a_checkpoint_that_resumes_bit_exact(python, tmpfs, tmp_path):
    fs, root, tmpdir, env = two_filesystems(tmpfs, tmp_path)
    p = subprocess.run(
        big_train_cmd(python, root, tmp_path / "reference"), capture_output=True, text=True, timeout=900, env=env
    )
    assert p.returncode == 0, p.stderr[-3000:]
    reference = load(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    for i, (save, delay) in enumerate([(1, 0.0), (1, 0.2), (2, 0.0), (2, 0.1), (2, 0.4), (3, 0.02), (3, 0.3)]):
        run_dir = fs / f"run{i}"
        kill_during_save(python, big_train_cmd(python, root, run_dir), run_dir, save, delay, env)
        last = run_dir / "checkpoints" / "last.ckpt"
        if (
            save == 1 and not last.exists()
        ):  # killed before the first checkpoint was complete: nothing to resume, nothing lost
            assert not list((run_dir / "checkpoints").glob("last*"))
        else:
            assert_killed_cleanly(run_dir, tmpdir)
        p = subprocess.run(big_train_cmd(python, root, run_dir), capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert_same_training_state(load(last), reference)
        subprocess.run(["rm", "-rf", str(run_dir)])


@pytest.mark.parametrize(
    "size, fits",
    [("3m", 0), pytest.param("9m", 1, marks=pytest.mark.slow)],
    ids=["no checkpoint fits", "one checkpoint fits"],
)  # the disk that fills during training covers the second
def test_training_into_a_run_dir_too_small_for_the_next_checkpoint_is_one_line_and_keeps_the_last(
    python, tmpfs, tmp_path, size, fits
):
    """The smoke run's checkpoints are 6.1 MB: on 3 MB none fits, on 9 MB the first does and the second (beside it until
    it replaces it) does not. One line, exit 2, no traceback, and no unloadable file either way."""
    fs = tmpfs(size)
    root = make_cifar(tmp_path / "cifar", n_train=20)
    run_dir = fs / "run"
    p = subprocess.run(
        train_cmd(python, root, run_dir, "trainer.max_epochs=3", "callbacks.sample_grid.n_per_class=1", net=()),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert lines[-1].startswith(
        f"error: cannot write a checkpoint to {run_dir / 'checkpoints' / 'last.ckpt'}: the disk is full (it needs "
    )
    assert "Traceback" not in p.stderr + p.stdout
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists() == bool(fits) and (
        not fits or load(last)["global_step"] == 10
    )  # the first epoch (10 steps), whole
    assert not list(fs.rglob(f"*{files.TMP_MARK}*"))


@pytest.mark.slow  # 27 s; the default suite keeps a run dir too small for the first checkpoint
def test_a_disk_that_fills_during_training_ends_in_one_line_and_the_checkpoint_loads(python, tmpfs, tmp_path):
    fs = tmpfs("64m")
    root = make_cifar(tmp_path / "cifar", n_train=20)
    run_dir = fs / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        train_cmd(python, root, run_dir, "trainer.max_epochs=50", "callbacks.sample_grid.n_per_class=1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: last.is_file() or proc.poll() is not None)
    fill(fs)  # the next write (a grid, the CSV log, a checkpoint) finds no room
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: cannot write ") and "the disk is full" in err, err[-2000:]
    assert "Traceback" not in out + err
    (fs / "filler").unlink()
    assert load(last)["global_step"] > 0


@pytest.mark.slow  # 18 s; the default suite keeps the full disk of a checkpoint save
def test_a_full_disk_during_a_sample_grid_and_during_an_evaluation(python, smoke_run, tmpfs, detector_file, tmp_path):
    run_dir, root = smoke_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    fs = tmpfs("1m")
    fill(fs, leave=8192)
    p = subprocess.run(
        [
            python,
            str(ROOT / "sample.py"),
            f"ckpt={ckpt}",
            "n=16",
            f"out={fs / 'samples'}",
            "sampler=ddim",
            "sampler.steps=2",
            f"hydra.run.dir={tmp_path / 'sample_run'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: cannot write ") and "the disk is full" in p.stderr
    p = subprocess.run(
        [
            python,
            str(ROOT / "evaluate.py"),
            f"ckpt={ckpt}",
            f"data.root={root}",
            f"metrics.inception_weights={detector_file}",
            "metrics.num_samples=10",
            "metrics.batch_size=10",
            "metrics.reference_images=20",
            f"metrics.cache_dir={fs / 'cache'}",
            "logger=csv",
            "sampler=ddim",
            "sampler.steps=2",
            f"hydra.run.dir={tmp_path / 'eval_run'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write the reference statistics (cache) to ") and "the disk is full" in last, (
        last
    )
    assert not list(fs.rglob(f"*{files.TMP_MARK}*"))
