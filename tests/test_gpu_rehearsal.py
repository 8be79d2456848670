"""The dress rehearsal of the GPU defaults on the CPU (issue 25): speed.profile=gpu turns on what a GPU gets by
default (trainer.precision=bf16-mixed, torch.compile, channels_last, bf16 sampling, the fused Adam every machine
gets) and runs them through the real train.py, a SIGKILL and a bit-exact resume, evaluate.py and sample.py, with
every training lever on (test_reliability's LEVERS).

On a CPU, torch.compile's inductor generates C++, not the Triton kernels of a GPU, and spends minutes doing it, so
the rehearsal compiles with backend aot_eager: Dynamo's graph capture (graph breaks, guards, recompiles) and
AOTAutograd's backward graph, the part the two backends share, run by eager kernels. What it cannot show: Triton's
code generation, CUDA graphs (mode reduce-overhead), and speed."""

import signal
import subprocess

import torch
from conftest import ROOT, make_cifar
from test_reliability import LEVERS, TINY_NET, assert_same_training_state, csv_rows, epoch_of, load, wait_for

GPU_PROFILE = ["speed.profile=gpu", "speed.compile_backend=aot_eager"]
FAILED = "torch.compile of the U-Net failed"  # FastNet's warning before it falls back to eager


def train_cmd(python, root, run_dir):
    return [
        python, str(ROOT / "train.py"), "experiment=smoke", "model=improved", f"data.root={root}",
        "data.classes=[automobile,cat]", "data.max_images=null", "data.batch_size=8", "trainer.max_epochs=3",
        "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
        "callbacks.sample_grid.n_per_class=2", "sampler.steps=2", "logger=csv", *TINY_NET, *LEVERS, *GPU_PROFILE,
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def test_the_gpu_defaults_train_resume_bit_exact_evaluate_and_sample_on_the_cpu(python, detector_file, tmp_path):
    root = make_cifar(tmp_path / "cifar", n_train=20)  # 40 images: 5 steps of 8 an epoch, 3 epochs
    reference = subprocess.Popen(  # the uninterrupted run, beside the one that is killed
        train_cmd(python, root, tmp_path / "reference"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    killed = subprocess.Popen(train_cmd(python, root, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: epoch_of(last) >= 0 or killed.poll() is not None)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert load(last)["global_step"] == 5  # killed after the first epoch's checkpoint
    resumed = subprocess.run(train_cmd(python, root, run_dir), capture_output=True, text=True, timeout=600)
    out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0 and resumed.returncode == 0, (out + resumed.stderr)[-3000:]
    for log in (out, resumed.stdout + resumed.stderr):
        on = "speed (gpu profile): precision bf16-mixed, torch.compile on (aot_eager), channels_last on, bf16 sampling on"
        assert on in log and FAILED not in log

    ckpt = load(last)
    assert_same_training_state(ckpt, load(tmp_path / "reference" / "checkpoints" / "last.ckpt"))
    assert csv_rows(run_dir) == csv_rows(tmp_path / "reference")
    speed = ckpt["hyper_parameters"]["speed"]
    assert (speed["compile"], speed["channels_last"], speed["bf16_sampling"]) == (True, True, True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True
    conv = next(v for k, v in ckpt["state_dict"].items() if v.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert (run_dir / "samples" / "epoch_0002.png").is_file()  # the grid, sampled compiled in bf16

    common = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # the two side by side
    evaluate = subprocess.Popen(
        [python, str(ROOT / "evaluate.py"), f"ckpt={last}", f"data.root={root}", *GPU_PROFILE, "logger=csv",
         f"metrics.inception_weights={detector_file}", "metrics.num_samples=8", "metrics.batch_size=8",
         "metrics.reference_images=8", f"metrics.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'eval'}"],
        **common,
    )  # fmt: skip
    sample = subprocess.Popen(
        [python, str(ROOT / "sample.py"), f"ckpt={last}", "n=4", "sampler=ddim", "sampler.steps=2", *GPU_PROFILE,
         f"out={tmp_path / 'samples'}"],
        **common,
    )  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in (evaluate, sample)]
    assert evaluate.returncode == 0 and (tmp_path / "eval" / "results.json").is_file(), outs[0][-3000:]
    assert sample.returncode == 0 and (tmp_path / "samples" / "grid.png").is_file(), outs[1][-3000:]
    assert all(FAILED not in out for out in outs)
