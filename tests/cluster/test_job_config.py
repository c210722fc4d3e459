"""load_job_config: YAML (or a mapping) -> FinetuneConfig, with clear errors naming the file."""
import os
import re
from pathlib import Path

import peft
import pytest

from cluster.job_config import load_job_config
from coserve.config import FinetuneConfig

JOB_YAML = """\
adapter: sql-lora
dataset: data/train.jsonl
peft:
  r: 8
  lora_alpha: 16
  target_modules: [q_proj, v_proj]
max_steps: 20
learning_rate: 1e-4       # YAML 1.1 would read this as a string
adam_betas: [0.9, 0.95]
max_grad_norm: 1.0
output_dir: ../out/sql
"""


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / "jobs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_round_trip_from_yaml(tmp_path):
    path = write(tmp_path, JOB_YAML)
    config = load_job_config(path)
    assert isinstance(config, FinetuneConfig)
    assert config.adapter == "sql-lora" and config.max_steps == 20
    assert config.learning_rate == pytest.approx(1e-4) and isinstance(config.learning_rate, float)
    assert config.adam_betas == (0.9, 0.95)
    assert config.max_grad_norm == 1.0 and config.batch_size == 4  # unspecified fields keep defaults
    assert isinstance(config.peft, peft.LoraConfig)
    assert config.peft.r == 8 and config.peft.lora_alpha == 16
    assert set(config.peft.target_modules) == {"q_proj", "v_proj"}


def test_relative_paths_resolve_against_the_yaml_directory(tmp_path, monkeypatch):
    path = write(tmp_path, JOB_YAML + "init_adapter: ./adapters/base\n")
    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    config = load_job_config(Path("jobs/job.yaml"))
    jobs_dir = tmp_path / "jobs"
    assert config.dataset == str(jobs_dir / "data" / "train.jsonl")
    assert config.output_dir == str(tmp_path / "out" / "sql")  # ".." normalized away
    assert config.init_adapter == str(jobs_dir / "adapters" / "base")
    assert all(os.path.isabs(p) for p in (config.dataset, config.output_dir, config.init_adapter))
    assert path.exists()


def test_absolute_paths_and_inline_rows_are_kept(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}]
    config = load_job_config({"adapter": "x", "dataset": rows, "init_adapter": "/abs/adapter"})
    assert config.dataset == rows and config.init_adapter == "/abs/adapter"


def test_mapping_source_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_job_config({"adapter": "x", "dataset": "train.jsonl", "peft": {"r": 4, "target_modules": "all-linear"}})
    assert config.dataset == str(tmp_path / "train.jsonl")
    assert config.peft.r == 4


def test_resume_from_checkpoint_is_resolved_against_the_file(tmp_path):
    path = write(tmp_path, JOB_YAML + "resume_from_checkpoint: ckpt/checkpoint-10\n")
    config = load_job_config(path)
    assert config.resume_from_checkpoint == str(tmp_path / "jobs" / "ckpt" / "checkpoint-10")
    latest = load_job_config(write(tmp_path, JOB_YAML + "resume_from_checkpoint: true\n", "latest.yaml"))
    assert latest.resume_from_checkpoint is True  # "the latest in output_dir", not a path


def test_overrides_replace_file_values_and_resolve_against_cwd(tmp_path, monkeypatch):
    path = write(tmp_path, JOB_YAML)
    monkeypatch.chdir(tmp_path)
    config = load_job_config(path, max_steps=5, output_dir="cli_out", learning_rate=3e-4)
    assert config.max_steps == 5 and config.learning_rate == 3e-4
    assert config.output_dir == str(tmp_path / "cli_out")
    assert config.dataset == str(tmp_path / "jobs" / "data" / "train.jsonl")


def test_unknown_fields_are_named_with_the_known_ones(tmp_path):
    path = write(tmp_path, JOB_YAML + "learnig_rate: 0.1\nepochs: 3\n")
    with pytest.raises(ValueError) as info:
        load_job_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown field(s)")
    assert "'learnig_rate' (did you mean 'learning_rate'?)" in message and "'epochs'" in message
    assert "FinetuneConfig fields are: adapter, dataset," in message
    with pytest.raises(ValueError, match="unknown field.*'max_step'"):
        load_job_config(write(tmp_path, JOB_YAML, "ok.yaml"), max_step=3)


def test_unknown_peft_fields_are_named(tmp_path):
    path = write(tmp_path, JOB_YAML.replace("  r: 8", "  rank: 8"))
    with pytest.raises(ValueError, match=r"unknown peft field\(s\) 'rank'.*peft.LoraConfig fields are: .*lora_alpha"):
        load_job_config(path)


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=f"{re.escape(str(missing))}: no such file"):
        load_job_config(missing)
    bad = write(tmp_path, "adapter: [unclosed\n", "bad.yaml")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: invalid YAML"):
        load_job_config(bad)
    listy = write(tmp_path, "- adapter: x\n", "list.yaml")
    with pytest.raises(ValueError, match=f"{re.escape(str(listy))}: expected a mapping.*got a list"):
        load_job_config(listy)
    empty = write(tmp_path, "", "empty.yaml")
    with pytest.raises(ValueError, match="empty file"):
        load_job_config(empty)


def test_finetune_config_validation_passes_through_with_the_file_name(tmp_path):
    path = write(tmp_path, JOB_YAML.replace("max_steps: 20", "max_steps: 0"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: max_steps must be a positive integer"):
        load_job_config(path)
    no_adapter = write(tmp_path, "dataset: d.jsonl\npeft: {r: 4, target_modules: [q_proj]}\n", "noad.yaml")
    with pytest.raises(ValueError, match="missing required field.*'adapter'"):
        load_job_config(no_adapter)
    with pytest.raises(ValueError, match="^job config: peft must be a mapping"):
        load_job_config({"adapter": "x", "dataset": "d.jsonl", "peft": 8})
