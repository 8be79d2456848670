"""Clusters without a cluster: two processes with SLURM's variables (Lightning's SLURMEnvironment), a fake srun and
scontrol on PATH, and submitit's local executor. Preemption signals, requeue, resume, a dead rank, the launchers."""

import csv
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_cifar
from test_reliability import assert_same_training_state, load, wait_for

FAKE_SLURM = ROOT / "tests" / "fake_slurm"


def train_args(root: Path, run_dir: Path, *extra: str, logger: str = "csv") -> list[str]:
    """A two-rank CPU DDP run of the smoke preset: 25 steps per epoch (100 images, batch 4 per rank)."""
    return [
        "experiment=smoke",
        "model=improved",
        f"data.root={root}",
        "data.classes=[automobile,cat]",
        "data.max_images=null",
        "data.batch_size=4",
        "trainer.check_val_every_n_epoch=2",
        f"logger={logger}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={run_dir}",
        *extra,
    ] + (["logger.wandb.online=false"] if logger == "wandb" else [])


def slurm_env(tmp: Path, job: str, **more: str) -> dict:
    """What sbatch gives a job of 2 tasks on one node, with the fake SLURM tools first on PATH."""
    return {
        **os.environ,
        "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(tmp / "scontrol.log"),
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "ddpm",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_STEP_ID": "0",
        **more,
    }


def new_job_id() -> str:
    return str(
        random.randint(1000, 9999)
    )  # Lightning's port is 10000 + the job id's last 4 digits: no clash between tests


def start_ranks(python: str, args: list[str], env: dict, script: str = "train.py") -> list[subprocess.Popen]:
    """The two tasks that srun would start: SLURM_PROCID/SLURM_LOCALID 0 and 1; their output goes to files (a pipe
    that nobody reads while they run would fill up and block them)."""
    procs = []
    for r in range(2):
        out = open(Path(env["FAKE_SLURM_LOG"]).with_name(f"{script}.{time.time_ns()}.rank{r}.out"), "w+")
        procs.append(
            subprocess.Popen(
                [python, str(ROOT / script), *args],
                env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        procs[-1].out = out
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for the processes; their output."""
    outs = []
    for p in procs:
        p.wait(timeout=timeout)
        p.out.seek(0)
        outs.append(p.out.read())
        p.out.close()
    return outs


def tasks_of(marker: str) -> list[int]:
    """The python processes of train.py whose command line holds ``marker`` (not the shells around them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if (
            proc.name.isdigit()
            and "python" in Path(argv[0]).name
            and any(a.endswith("train.py") for a in argv)
            and any(marker in a for a in argv)
        ):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def slurm_reference(tmp_path_factory, python):
    """An uninterrupted two-rank run under SLURM's variables: 4 epochs of 25 steps."""
    tmp = tmp_path_factory.mktemp("slurm")
    root = make_cifar(tmp / "cifar", n_train=100)
    procs = start_ranks(
        python, train_args(root, tmp / "reference", "trainer.max_epochs=4"), slurm_env(tmp, new_job_id())
    )
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 ranks on 1 node(s), from SLURMEnvironment" in outs[0]
    return root, load(tmp / "reference" / "checkpoints" / "last.ckpt")


@pytest.mark.slow  # 52 s with its two-rank reference; the default suite keeps a preemption and its resume (one process)
def test_sigusr2_on_slurm_saves_requeues_and_the_requeued_job_ends_bit_exact(python, slurm_reference, tmp_path):
    root, reference = slurm_reference
    job, run_dir = new_job_id(), tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    env = slurm_env(tmp_path, job)
    args = train_args(root, run_dir, "trainer.max_epochs=4", logger="wandb")
    procs = start_ranks(python, args, env)
    wait_for(lambda: last.is_file() or any(p.poll() is not None for p in procs))
    time.sleep(1.0)  # into epoch 1
    for p in procs:
        p.send_signal(signal.SIGUSR2)  # submitit's signal, to every task (as SLURM sends --signal)
    outs = finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [128 + signal.SIGUSR2] * 2, outs[0][-3000:]  # not "completed"
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {job}"]  # by rank 0 alone
    assert f"requeued (scontrol requeue {job})" in outs[0] and "rank 0 requeues the job" in outs[1]
    stopped = load(last)["global_step"]
    assert 25 <= stopped < 100
    procs = start_ranks(python, args, env)  # the requeued job: the same command in the same dir
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    assert f"resuming from {last}" in outs[0]
    assert_same_training_state(load(last), reference)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()  # one W&B run, from rank 0, resumed by the requeued job
    assert {r.name.rsplit("-", 1)[1] for r in (run_dir / "wandb").glob("offline-run-*")} == {run_id}


@pytest.mark.slow  # 17 s; its 8 s sleep assumes an idle CPU; the one-process FID-signal test stays in the default suite
def test_a_signal_during_the_sample_grid_stops_every_rank_within_seconds(python, slurm_reference, tmp_path):
    """SIGUSR1 (plain sbatch --signal=USR1@90) while rank 0 draws a long ancestral sample grid at the end of epoch 1."""
    root, _ = slurm_reference
    job, run_dir = new_job_id(), tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    procs = start_ranks(
        python,
        train_args(root, run_dir, "trainer.max_epochs=4", "sampler=ancestral", "callbacks.sample_grid.n_per_class=200"),
        slurm_env(tmp_path, job),
    )
    wait_for(lambda: last.is_file() or any(p.poll() is not None for p in procs))
    time.sleep(8.0)  # epoch 1 trains in about 3 s; its grid (400 images, 500 steps) takes minutes on this CPU
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    signalled = time.time()
    outs = finish(procs, timeout=120)
    took = time.time() - signalled
    assert [p.returncode for p in procs] == [128 + signal.SIGUSR1] * 2, outs[0][-3000:]
    assert "SIGUSR1 during the validation after step 50" in outs[0], outs[0][-3000:]
    assert took < 30, took
    assert load(last)["global_step"] == 50 and not (run_dir / "samples" / "epoch_0001.png").exists()
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {job}"]


@pytest.mark.slow  # about 60 s: the reference statistics and a long FID evaluation
def test_a_signal_during_the_fid_evaluation_stops_every_rank_within_seconds(
    python, slurm_reference, detector_file, tmp_path
):
    root, _ = slurm_reference
    run_dir = tmp_path / "run"
    grid = run_dir / "samples" / "epoch_0001.png"
    procs = start_ranks(
        python,
        train_args(
            root,
            run_dir,
            "trainer.max_epochs=4",
            "sampler=ancestral",
            "callbacks.fid.every_n_epochs=2",
            f"metrics.inception_weights={detector_file}",
            "metrics.num_samples=400",
            "metrics.batch_size=50",
            f"metrics.cache_dir={tmp_path / 'cache'}",
            "metrics.reference_images=100",
        ),
        slurm_env(tmp_path, new_job_id()),
    )
    wait_for(
        lambda: grid.is_file() or any(p.poll() is not None for p in procs)
    )  # the grid is drawn: FID sampling follows
    time.sleep(2.0)
    for p in procs:
        p.send_signal(signal.SIGUSR2)
    signalled = time.time()
    outs = finish(procs, timeout=120)
    assert time.time() - signalled < 30
    assert [p.returncode for p in procs] == [128 + signal.SIGUSR2] * 2, outs[0][-3000:]
    assert "SIGUSR2 during the validation after step 50" in outs[0]
    assert "val/fid" not in (run_dir / "csv" / "metrics.csv").read_text()


def test_a_signal_during_the_fid_evaluation_stops_within_seconds_one_process(python, detector_file, tmp_path):
    """The default suite's case of the slow two-rank test above: one process, a small reference, SIGUSR2 once the
    epoch's grid is drawn, while the FID's 400 ancestral samples are being made; the resumed run redoes that
    validation, so its val/loss and FID are in the log once, and the later ones follow."""
    root = make_cifar(tmp_path / "cifar", n_train=50)
    run_dir = tmp_path / "run"
    grid = run_dir / "samples" / "epoch_0001.png"
    args = [
        a
        for a in train_args(
            root,
            run_dir,
            "trainer.max_epochs=2",
            "sampler=ancestral",
            "callbacks.fid.every_n_epochs=2",
            f"metrics.inception_weights={detector_file}",
            "metrics.num_samples=400",
            "metrics.batch_size=50",
            f"metrics.cache_dir={tmp_path / 'cache'}",
            "metrics.reference_images=20",
            "trainer.devices=1",
        )
        if a not in ("trainer=ddp", "trainer.devices=2")
    ]
    out = open(tmp_path / "out", "w+")
    proc = subprocess.Popen([python, str(ROOT / "train.py"), *args], stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: grid.is_file() or proc.poll() is not None)  # the grid is drawn: FID sampling follows
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR2)
    signalled = time.time()
    proc.wait(timeout=120)
    out.seek(0)
    text = out.read()
    assert time.time() - signalled < 20
    assert proc.returncode == 128 + signal.SIGUSR2, text[-3000:]
    assert "SIGUSR2 during the validation after step" in text
    assert "val/fid" not in (run_dir / "csv" / "metrics.csv").read_text()  # the stopped evaluation logged nothing
    stopped_at = load(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert stopped_at % 25 == 0
    quick = [a for a in args if not a.startswith(("sampler=", "metrics.num_samples="))]  # evaluation settings only
    quick += ["sampler=ddim", "sampler.steps=3", "metrics.num_samples=20"]
    p = subprocess.run([python, str(ROOT / "train.py"), *quick], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    val = [int(r["epoch"]) for r in rows if r.get("val/loss")]
    fid = [int(r["epoch"]) for r in rows if r.get("val/fid")]
    assert stopped_at == 50 and val == fid == [1], (val, fid)  # the cut validation, redone on resume, logged once


@pytest.mark.slow  # 23 s; the default suite keeps the classification of failed collectives (test_a_failed_collective_...)
def test_a_hung_rank_ends_the_other_after_the_process_group_timeout(python, slurm_reference, tmp_path):
    """SIGSTOP on rank 1 mid-training: rank 0 waits trainer.process_group_timeout (10 s) in its next collective, then
    ends with one line; the last checkpoint is whole."""
    root, _ = slurm_reference
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    procs = start_ranks(
        python,
        train_args(root, run_dir, "trainer.max_epochs=4", "trainer.process_group_timeout=10"),
        slurm_env(tmp_path, new_job_id()),
    )
    try:
        wait_for(lambda: last.is_file() or any(p.poll() is not None for p in procs))
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        out = finish(procs[:1], timeout=90)[0]
        took = time.time() - stopped
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 1 and 10 <= took < 60, (took, out[-3000:])
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: rank 0 of 2 lost the others at step")
        and "a rank died or hung" in errors[0]
    ), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert load(last)["global_step"] % 25 == 0


@pytest.mark.slow  # 19 s; see the hung-rank test
def test_a_dead_rank_ends_the_other_with_one_line_and_the_next_run_resumes(python, slurm_reference, tmp_path):
    root, _ = slurm_reference
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = train_args(root, run_dir, "trainer.max_epochs=2", "trainer.process_group_timeout=20")
    env = slurm_env(tmp_path, new_job_id())
    procs = start_ranks(python, args, env)
    wait_for(lambda: last.is_file() or any(p.poll() is not None for p in procs))
    time.sleep(1.0)
    procs[1].kill()
    killed = time.time()
    out = finish(procs[:1], timeout=60)[0]
    procs[1].wait()
    assert time.time() - killed < 20 + 10 and procs[0].returncode == 1
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: rank 0 of 2 lost the others at step")
        and "rerun the same command" in errors[0]
    )
    assert "Traceback" not in out
    assert load(last)["global_step"] == 25  # the epoch-end checkpoint before the kill, whole
    procs = start_ranks(python, args, env)
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    assert f"resuming from {last}" in outs[0] and load(last)["global_step"] == 50


@pytest.mark.slow  # about 45 s
def test_the_sbatch_example_with_fake_slurm_tools_requeues_on_sigusr1_and_resumes(python, slurm_reference, tmp_path):
    """scripts/slurm/train.sbatch under a fake srun (two tasks) and scontrol; SIGUSR1 to the tasks as --signal=USR1@90."""
    root, reference = slurm_reference
    job, run_dir = new_job_id(), tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    env = {
        k: v
        for k, v in slurm_env(tmp_path, job, SLURM_SUBMIT_DIR=str(ROOT), PYTHON=python).items()
        if k not in ("SLURM_NTASKS", "SLURM_NODEID", "SLURM_STEP_ID", "SLURM_NODELIST")
    }  # srun sets these
    args = [
        a
        for a in train_args(root, run_dir, "trainer.max_epochs=4")
        if not a.startswith(("trainer=", "trainer.devices="))
    ]
    command = ["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), *args]
    job_proc = subprocess.Popen(command, env=env, stdout=open(tmp_path / "job.out", "w"), stderr=subprocess.STDOUT)
    wait_for(lambda: last.is_file() or job_proc.poll() is not None)
    time.sleep(1.0)
    tasks = tasks_of(str(run_dir))
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR1)
    job_proc.wait(timeout=120)
    out = (tmp_path / "job.out").read_text()
    assert job_proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().splitlines() == [f"requeue {job}"]
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)  # SLURM runs the script again
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert_same_training_state(load(last), reference)


@pytest.mark.slow  # about 90 s: two jobs of two ranks side by side, one minute's time limit, a requeue
def test_submitit_local_sweep_jobs_own_their_dirs_and_wandb_runs_and_a_timed_out_job_is_requeued(python, tmp_path):
    root = make_cifar(tmp_path / "cifar", n_train=100)
    sweep = tmp_path / "sweep"
    p = subprocess.run(
        [
            python,
            str(ROOT / "train.py"),
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.timeout_min=1",
            "experiment=smoke",
            "model=simple,improved",
            f"data.root={root}",
            "data.classes=[automobile,cat]",
            "data.max_images=null",
            "data.batch_size=4",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=6",
            "trainer.check_val_every_n_epoch=3",
            "logger=wandb",
            "logger.wandb.online=false",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra:runtime.choices.model}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # two jobs of two ranks side by side on two cores
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    logs = "".join(f.read_text() for f in sweep.glob(".submitit/*/*_log.*"))
    requeued = [
        d for d in ("simple", "improved") if "requeueing through submitit" in (sweep / d / "train.log").read_text()
    ]
    assert requeued, logs[-3000:]  # start-up and 150 steps take longer than the 30 s before submitit's SIGUSR2
    for d in ("simple", "improved"):
        run = sweep / d
        assert (
            "2 ranks on 1 node(s), from LightningEnvironment" in (run / "train.log").read_text()
        )  # submitit's tasks as DDP ranks
        assert (
            json.loads((run / "done.json").read_text())["global_step"] == 150
            and (run / "checkpoints" / "last.ckpt").is_file()
        )
        run_id = (run / "wandb_id.txt").read_text().strip()
        assert {r.name.rsplit("-", 1)[1] for r in (run / "wandb").glob("offline-run-*")} == {
            run_id
        }  # one W&B run, resumed
    for d in requeued:
        assert "resuming from" in (sweep / d / "train.log").read_text()


@pytest.mark.slow  # about 60 s: one evaluation with one process, then with two
def test_evaluate_py_over_two_ranks_gives_the_single_process_numbers(python, smoke_run, detector_file, tmp_path):
    run_dir, root = smoke_run
    common = [
        f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"data.root={root}",
        f"metrics.inception_weights={detector_file}",
        "metrics.num_samples=120",
        "metrics.batch_size=25",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "sampler=ddim",
        "sampler.steps=5",
        "logger=csv",
    ]
    one = subprocess.run(
        [python, str(ROOT / "evaluate.py"), *common, f"hydra.run.dir={tmp_path / 'one'}"],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    env = slurm_env(tmp_path, new_job_id())
    ranks = start_ranks(python, [*common, f"hydra.run.dir={tmp_path / 'two'}"], env, script="evaluate.py")
    outs = finish(ranks)
    assert [p.returncode for p in ranks] == [0, 0], outs[0][-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for key in ("fid", "kid_mean", "kid_std", "is_mean", "fid_floor"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert b["fid_ci95"] == pytest.approx(a["fid_ci95"], rel=1e-6) and b["kid_ci95"] == pytest.approx(
        a["kid_ci95"], rel=1e-6
    )
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".hydra",
        "evaluate.log",
        "evaluate_rank1.log",
        "results.csv",
        "results.json",
    ]


def test_preemption_signals_and_the_submitit_signal_variable(monkeypatch):
    from ddpm_lightning.cluster import preempt_signals
    from ddpm_lightning.errors import ConfigError

    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert preempt_signals() == [signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM]
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "URG")
    assert preempt_signals() == [signal.SIGURG, signal.SIGUSR1, signal.SIGTERM]
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # no signal twice
    assert preempt_signals() == [signal.SIGUSR1, signal.SIGTERM]
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "NOPE")
    with pytest.raises(ConfigError, match="SUBMITIT_PREEMPT_SIGNAL=NOPE is not a signal"):
        preempt_signals()


def test_run_dir_under_srun_is_the_job_s_so_a_requeued_job_resumes_there(monkeypatch):
    from ddpm_lightning import _job_or_now

    for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(k, raising=False)
    assert _job_or_now("%Y") == time.strftime("%Y")
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert _job_or_now("%Y") == "slurm/812/step0"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "800")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert _job_or_now("%Y") == "slurm/800_3/step0"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun --pty bash: not a job's own dir
    assert _job_or_now("%Y") == time.strftime("%Y")


from test_schema import files, refused  # noqa: E402,F401  (the fixture and the one-line check of the schema tests)

LAUNCHER_BAD = [
    (
        ["-m", "trainer=ddp", "trainer.devices=2", "model=simple,improved"],
        "Lightning would relaunch the whole sweep in every rank; run the sweep with hydra/launcher=local",
    ),
    (["hydra/launcher=slurm", "trainer.devices=2"], "hydra/launcher=slurm takes effect with -m"),
    (["-m", "hydra/launcher=slurm", "trainer=ddp"], "set trainer.devices to a number"),
    (
        ["-m", "hydra/launcher=slurm", "trainer.devices=2", "hydra.launcher.tasks_per_node=4"],
        "Lightning needs one task per device",
    ),
    (
        ["-m", "hydra/launcher=slurm", "trainer.num_nodes=2", "hydra.launcher.nodes=1"],
        "hydra.launcher.nodes=1 but trainer.num_nodes=2",
    ),
    (["-m", "hydra/launcher=local", "trainer.devices=1,2"], "trainer.devices is swept"),
    (["-m", "hydra/launcher=local", "trainer.num_nodes=2"], "use hydra/launcher=slurm for several nodes"),
    (["-m", "hydra/launcher=slurm", "trainer.num_nodes=0"], "trainer.num_nodes=0 must be >= 1"),
    (["trainer.process_group_timeout=1"], "trainer.process_group_timeout=1 must be >= 10"),
]


@pytest.mark.parametrize("args, says", LAUNCHER_BAD)
def test_launcher_settings_are_checked_before_anything_is_submitted(args, says, files, capsys):  # noqa: F811 (the fixture)
    assert says in refused("config", args, files, capsys)


def test_srun_task_counts_must_match_the_devices(monkeypatch):
    from ddpm_lightning.cluster import check_tasks
    from ddpm_lightning.errors import ConfigError

    for k, v in {
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NAME": "ddpm",
    }.items():
        monkeypatch.setenv(k, v)
    check_tasks(4, 2)
    with pytest.raises(
        ConfigError, match=r"SLURM runs 4 tasks per node but trainer.devices=2: .* set trainer.devices=4"
    ):
        check_tasks(2, 2)
    with pytest.raises(ConfigError, match=r"SLURM gives 2 nodes but trainer.num_nodes=1; set trainer.num_nodes=2"):
        check_tasks(4, 1)


def test_the_slurm_launcher_follows_the_trainer_and_requeues_timed_out_jobs():
    from ddpm_lightning.schema import compose

    cfg = compose(
        "config",
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "trainer.devices=4",
            "hydra.launcher.partition=gpu",
        ],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 4, 4, "gpu")
    assert launcher.max_num_timeout > 0 and launcher._target_.endswith("SlurmLauncher")
    assert (
        compose(
            "evaluate", overrides=["hydra/launcher=slurm", "ckpt=x"], return_hydra_config=True
        ).hydra.launcher.tasks_per_node
        == 1
    )


@pytest.mark.parametrize(
    "got, acted_on",
    [
        ([0, 0], 0),
        ([0, signal.SIGUSR1], signal.SIGUSR1),
        ([signal.SIGTERM, signal.SIGUSR2], signal.SIGUSR2),
        ([signal.SIGTERM, 0], signal.SIGTERM),
    ],
)
def test_every_rank_acts_on_one_signal_and_a_requeue_signal_wins(got, acted_on, monkeypatch):
    """The ranks' signals are gathered: rank 0 requeues even when only another rank has had SIGUSR1 so far."""
    import torch

    from ddpm_lightning import callbacks

    class Strategy:
        root_device = torch.device("cpu")

        def all_gather(self, t):
            return torch.tensor(got)

    class Trainer:
        world_size, strategy = 2, Strategy()

    monkeypatch.setattr(callbacks.SIGNALS, "received", signal.Signals(got[0]) if got[0] else None)
    assert callbacks.agreed_signal(Trainer()) == acted_on


def test_a_signal_stops_at_once_before_training_is_recorded_during_it_and_ends_a_finished_job_normally():
    from ddpm_lightning.cluster import Preempted, Signals

    before = Signals()
    with pytest.raises(Preempted, match="SIGUSR1 before training started"):
        before.handler(signal.SIGUSR1, None)
    before.handler(signal.SIGTERM, None)  # a second signal while the first is being handled: no second exception
    assert before.received == signal.SIGUSR1
    during, after = Signals(), Signals()
    during.stage, after.stage = "training", "done"
    during.handler(signal.SIGUSR2, None)
    after.handler(signal.SIGUSR2, None)
    assert during.requested() and after.requested()


def test_a_failed_collective_is_told_from_other_errors_by_its_type_or_text_and_through_its_chain():
    import torch.distributed as dist

    from ddpm_lightning.cluster import lost_peer

    assert lost_peer(dist.DistBackendError("anything"))
    assert lost_peer(
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Application timeout caused pair closure")
    )
    assert lost_peer(RuntimeError("Timed out waiting 10000ms for recv operation to complete"))
    try:
        try:
            raise RuntimeError("Connection reset by peer")
        except RuntimeError:
            raise ValueError("the checkpoint callback failed")  # noqa: B904 (raised while handling the lost collective)
    except ValueError as e:
        assert lost_peer(e)
    assert not lost_peer(ValueError("data.batch_size=0 must be at least 1"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x3)"))
