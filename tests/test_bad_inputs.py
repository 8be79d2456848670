"""Bad inputs a new user meets (issue 25's campaign), each one line that names the problem and the fix, checked in
process where the check lives (the entry points turn a ConfigError into that line and exit 2)."""

import json

import pytest
from conftest import make_cifar

from ddpm_lightning import files, report, schema
from ddpm_lightning.data import load_subset
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.loggers import ResumedCSVWriter, build_loggers


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_a_data_root_without_one_of_the_classes_is_refused(tmp_path):
    folder = make_cifar(tmp_path / "cifar", labels=(1, 3)) / "cifar-10-batches-py"  # automobile and cat only
    assert len(load_subset(folder, ["automobile", "cat"], "train")[0]) == 40
    with pytest.raises(ConfigError) as e:
        load_subset(folder, ["airplane", "automobile", "cat", "horse", "ship"], "train")
    assert f"{folder} has no train images of airplane, horse, ship (data.classes:" in one_line(e)


@pytest.mark.parametrize("content", [b'{"fid": 98.', b"\xff\xfe garbage \x80"], ids=["cut short", "garbage"])
def test_report_names_a_results_file_or_stage_log_it_cannot_read(tmp_path, content):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        report.read_json(path, "an evaluation's results")
    assert f"an evaluation's results {path} is not readable JSON" in one_line(e)
    path.write_bytes(b'{"stage": "train"}\n' + content)
    with pytest.raises(ConfigError):
        report.read_json(path, "the paper's stage log", lines=True)


def test_a_garbage_metrics_csv_before_a_resume_is_named(tmp_path):
    (tmp_path / "metrics.csv").write_bytes(b"step,loss\n\xff\xfe\x80,1\n")
    with pytest.raises(ConfigError) as e:
        ResumedCSVWriter(str(tmp_path), resumed_step=10)
    assert f"the run's log {tmp_path / 'metrics.csv'} is not the CSV log Lightning writes" in one_line(e)
    (tmp_path / "metrics.csv").write_text("step,loss\n3,1.0\n12,0.5\n")
    ResumedCSVWriter(str(tmp_path), resumed_step=10)  # a good log keeps the rows before the resumed step
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "3,1.0"]


def test_w_and_b_failing_to_start_is_one_line_that_names_it_and_the_run_dir(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    def broken(self):
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(WandbLogger, "experiment", property(broken))
    cfg = schema.compose("config", ["experiment=smoke", "logger=wandb"])
    run_dir = tmp_path / "run\udcff"
    with pytest.raises(ConfigError) as e:
        build_loggers(cfg, run_dir, None)
    assert one_line(e).startswith(f"W&B could not start its run in {ascii(str(run_dir))} (UnicodeEncodeError")


def test_a_file_where_the_output_folder_must_be_is_one_line_and_hides_nothing(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(ConfigError) as e:
        files.write_bytes(tmp_path / "checkpoints" / "last.ckpt", b"weights", "a checkpoint")
    assert f"cannot write a checkpoint to {tmp_path / 'checkpoints' / 'last.ckpt'}: a file stands where a folder" in (
        one_line(e)
    )
    with pytest.raises(ConfigError) as e:
        files.writable_dir(tmp_path / "checkpoints")
    assert one_line(e).startswith(f"{tmp_path / 'checkpoints'} is a file where a folder must be")
    assert json.loads(json.dumps((tmp_path / "checkpoints").read_text())) == "not a folder"
