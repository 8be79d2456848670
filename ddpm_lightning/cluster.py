"""Clusters: where a run's ranks come from, who owns the preemption signals, and how a stopped job comes back.

- Ranks. Under SLURM (srun, plain sbatch or hydra/launcher=slurm) Lightning's SLURMEnvironment reads them from srun's
  variables; under hydra/launcher=local, submitit's JobEnvironment is exported as torch.distributed's variables,
  which Lightning's LightningEnvironment reads. Neither launches a process.
- Signals. submitit's preemption signal (SIGUSR2, or $SUBMITIT_PREEMPT_SIGNAL), SIGUSR1 (``sbatch --signal=USR1@90``)
  and SIGTERM have one owner, ``SIGNALS``: during training it only records the signal, and callbacks.Preemption stops
  every rank at one agreed point and has rank 0 write last.ckpt; before training it stops at once; after training
  the finished job ends normally.
- Requeue. After last.ckpt is written, rank 0 requeues the job on a time-limit signal (SIGUSR1/SIGUSR2): through
  submitit's own handler (its checkpoint/requeue path) when submitit runs the job, else ``scontrol requeue
  $SLURM_JOB_ID``. SIGTERM (scancel, or SLURM's preemption, which requeues by itself when PreemptMode=REQUEUE) stops
  without a requeue. The process exits with 128 + the signal's number: never as "completed".
"""

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from datetime import timedelta

from ddpm_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class Preempted(BaseException):
    """A preemption signal stopped the run (after last.ckpt was written, when training had started). A BaseException,
    like KeyboardInterrupt: no error handler on the way takes it for a failure."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def preempt_signals() -> list[signal.Signals]:
    """submitit's signal (SIGUSR2 unless $SUBMITIT_PREEMPT_SIGNAL names another), SIGUSR1 and SIGTERM."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    submitit_signal = getattr(signal, f"SIG{name}", None)
    if not isinstance(submitit_signal, signal.Signals):
        raise ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={name} is not a signal; unset it or give a name such as USR2")
    return list(dict.fromkeys([submitit_signal, signal.SIGUSR1, signal.SIGTERM]))


class Signals:
    """The one owner of the preemption signals in this process; the first signal counts. What it does depends on the
    run's ``stage``: "starting" (until the training loop runs): stop at once, there is nothing new to save;
    "training": record it, and callbacks.Preemption stops every rank at the next agreed point; "done" (training has
    ended): record it, and the finished job ends normally."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self.stage = "starting"
        self.previous: dict[signal.Signals, object] = {}  # the handlers found at the first install (submitit's)

    def install(self) -> None:
        """Take the signals (again: Lightning registers its own SIGTERM handler when fit starts)."""
        for signum in preempt_signals():
            current = signal.getsignal(signum)
            if current != self.handler:
                self.previous.setdefault(signum, current)
                signal.signal(signum, self.handler)

    def handler(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            if self.stage == "starting":
                raise Preempted(signum, f"{self.received.name} before training started: nothing new to save")

    def requested(self) -> bool:
        return self.received is not None

    def submitit_handler(self):
        """submitit's checkpoint-and-requeue handler, when submitit runs this job."""
        for handler in self.previous.values():
            owner = getattr(handler, "__self__", None)
            if (
                owner is not None
                and type(owner).__module__.startswith("submitit")
                and hasattr(owner, "checkpoint_and_try_requeue")
            ):
                return owner.checkpoint_and_try_requeue
        return None


SIGNALS = Signals()


def slurm_job_id() -> str | None:
    """The job to requeue: ARRAY_JOB_ID_TASK_ID for an array element, else SLURM_JOB_ID (as Lightning's requeue)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(signum: int) -> str:
    """Rank 0, after last.ckpt is written: requeue the job on a time-limit signal. Returns what was done. submitit's
    handler (pickles the job for its rerun, requeues, and exits) does not return."""
    if signal.Signals(signum) == signal.SIGTERM:
        return "not requeued (SIGTERM: scancel, or a preemption that SLURM requeues by itself)"
    submitit_handler = SIGNALS.submitit_handler()
    if submitit_handler is not None:
        log.warning("requeueing through submitit (it pickles the job for its rerun, requeues it and exits)")
        submitit_handler(signum, None)  # on rank 0 it exits (or raises when the job timed out too often)
        return "not requeued (submitit's handler returned)"
    job = slurm_job_id()
    if job is None:
        return "not requeued (not a SLURM job)"
    if not re.fullmatch(r"[0-9_]+", job):
        return f"not requeued (SLURM job id {job!r} is not a number)"
    try:
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"requeue failed: scontrol requeue {job}: {e}"
    if p.returncode:
        return f"requeue failed: scontrol requeue {job} exited {p.returncode}: {' '.join(p.stderr.split())[:200]}"
    return f"requeued (scontrol requeue {job})"


def exit_code(signum: int) -> int:
    """128 + the signal's number, as a shell reports a process ended by that signal: never 0 ("completed")."""
    return 128 + int(signum)


def slurm_tasks() -> bool:
    """Whether srun started this process as one of a job's tasks (what Lightning's SLURMEnvironment.detect checks)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def global_rank() -> int:
    """This process's rank from the launcher's variables (srun, torchrun, submitit), before torch.distributed starts."""
    if slurm_tasks():
        return int(os.environ["SLURM_PROCID"])
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        return int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", 0))
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def check_tasks(devices, num_nodes: int) -> None:
    """Lightning needs one task per device on every node: srun's (or submitit's) counts against trainer.devices and
    trainer.num_nodes, said in one line."""
    if slurm_tasks():
        per_node, nodes, where = (
            os.environ.get("SLURM_NTASKS_PER_NODE", "1"),
            os.environ.get("SLURM_NNODES", "1"),
            "SLURM",
        )
    elif os.environ.get("SUBMITIT_EXECUTOR") == "local":
        per_node, nodes, where = os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"), "1", "submitit's local executor"
    else:
        return
    per_node = per_node.split("(")[0]  # SLURM writes "2(x3)" for 2 tasks on each of 3 nodes
    if str(devices) != per_node:
        raise ConfigError(
            f"{where} runs {per_node} tasks per node but trainer.devices={devices}: Lightning needs one task per device; "
            f"set trainer.devices={per_node}, or ask for {devices} tasks per node (--ntasks-per-node, hydra.launcher.tasks_per_node)"
        )
    if str(num_nodes) != nodes:
        raise ConfigError(
            f"{where} gives {nodes} nodes but trainer.num_nodes={num_nodes}; set trainer.num_nodes={nodes}, "
            f"or ask for {num_nodes} nodes (--nodes, hydra.launcher.nodes)"
        )


def trainer_environment(cfg) -> dict:
    """Trainer arguments for where the run is: SLURM's environment without Lightning's own requeue handler (SIGNALS
    owns the signals); submitit's local tasks as torch.distributed variables; DDP with the process-group timeout."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    t = cfg.trainer
    check_tasks(t.devices, t.num_nodes)
    args = {}
    if slurm_tasks():
        args["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    elif os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", 1)) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False
        )  # Lightning's LightningEnvironment reads these
    if t.strategy == "ddp":
        args["strategy"] = DDPStrategy(timeout=timedelta(seconds=t.process_group_timeout))
    return args


LOST_WORDS = (
    "timed out",
    "timeout",
    "connection reset",
    "connection closed",
    "connection refused",
    "closed by peer",
    "pair closure",
    "socket",
    "gloo",
    "nccl",
)


def lost_peer(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from or during) is a failed collective: torch.distributed's own
    error types, or gloo's and NCCL's RuntimeErrors, which say it only in their text (and source path)."""
    import torch.distributed as dist

    while e is not None:
        if isinstance(e, dist.DistError) or any(w in str(e).lower() for w in LOST_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def lost_ranks(trainer, run_dir):
    """A collective that fails or times out (another rank died or hung; trainer.process_group_timeout) ends this rank
    with one line and exit code 1. last.ckpt is the last one written whole (Lightning writes it atomically); a rerun
    in the same run dir resumes from it."""
    try:
        yield
    except Exception as e:
        text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", " ".join(str(e).split()))  # without the C++ source path
        if trainer.world_size == 1 or not lost_peer(e):
            raise
        print(
            f"error: rank {trainer.global_rank} of {trainer.world_size} lost the others at step {trainer.global_step} "
            f"({type(e).__name__}: {text[:160]}); a rank died or hung. {run_dir / 'checkpoints' / 'last.ckpt'} is the last whole "
            f"checkpoint: rerun the same command to resume",
            file=sys.stderr,
        )
        sys.exit(1)


def launcher_environment():
    """Lightning's environment for the ranks that srun or torchrun started (evaluate.py), or None for one process."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = (
        SLURMEnvironment()
        if SLURMEnvironment.detect()
        else TorchElasticEnvironment()
        if TorchElasticEnvironment.detect()
        else None
    )
    return env if env is not None and env.world_size() > 1 else None


def rank_device(device: str) -> str:
    """This rank's device: cuda:<local rank> when there are several ranks on a GPU machine."""
    import torch

    env = launcher_environment()
    if env is None or device == "cpu" or not torch.cuda.is_available():
        return device
    torch.cuda.set_device(env.local_rank())
    return f"cuda:{env.local_rank()}"


def start_ranks(device: str, timeout_s: int = 300) -> tuple[int, int]:
    """torch.distributed over the ranks that srun or torchrun started (NCCL on GPUs, else gloo); (rank, world size)."""
    import torch.distributed as dist

    env = launcher_environment()
    if env is None:
        return 0, 1
    dist.init_process_group(
        "nccl" if str(device).startswith("cuda") else "gloo",
        init_method=f"tcp://{env.main_address}:{env.main_port}",
        rank=env.global_rank(),
        world_size=env.world_size(),
        timeout=timedelta(seconds=timeout_s),
    )
    return env.global_rank(), env.world_size()
