"""`coserve serve` / `coserve finetune`: refusals, progress lines and cancel, without a Ray cluster.

Refusals run the real `.venv/bin/coserve` in a subprocess: each must fail
fast, with exit code 2 and a message on stderr that names the problem, before
anything is started or submitted. The progress display and Ctrl-C cancel run
in process against a scripted job. The commands against a live cluster are
tested in test_ray_job_submission.py.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

COSERVE = str(Path(sys.executable).with_name("coserve"))
# Generous for 2 shared cores: `finetune` imports peft and torch (about 5 s alone) before it connects.
TIMEOUT_S = 60
UNREACHABLE = "127.0.0.1:1"   # port 1 (tcpmux) is never a Ray cluster; the TCP check is refused at once

JOB_YAML = """\
adapter: cli-lora
dataset: train.jsonl
peft: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}
max_steps: 2
"""


def run_coserve(*args, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)   # the commands default to it; these tests name their address
    start = time.monotonic()
    result = subprocess.run([COSERVE, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)
    return result, time.monotonic() - start


@pytest.fixture
def job_dir(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "job.yaml").write_text(JOB_YAML)
    return tmp_path


def test_unknown_yaml_field_is_named_and_nothing_is_submitted(job_dir):
    (job_dir / "job.yaml").write_text(JOB_YAML + "learning_rat: 0.01\n")
    # No cluster at this address: a config error must be reported before any connection is tried.
    result, _ = run_coserve("finetune", str(job_dir / "job.yaml"), "--deployment", "x", "--ray-address", UNREACHABLE)
    assert result.returncode == 2, result.stderr
    assert "learning_rat" in result.stderr and "did you mean 'learning_rate'" in result.stderr
    assert "does not answer" not in result.stderr
    assert result.stdout == ""


def test_missing_dataset_fails_before_connecting(job_dir):
    (job_dir / "train.jsonl").unlink()
    result, _ = run_coserve("finetune", "job.yaml", "--ray-address", UNREACHABLE, cwd=job_dir)
    assert result.returncode == 2, result.stderr
    assert "train.jsonl" in result.stderr and "does not answer" not in result.stderr


def test_finetune_unreachable_address_fails_fast_naming_it(job_dir):
    result, seconds = run_coserve("finetune", str(job_dir / "job.yaml"), "--ray-address", UNREACHABLE)
    assert result.returncode == 2, result.stderr
    assert f"'{UNREACHABLE}'" in result.stderr and "does not answer" in result.stderr
    assert seconds < 45, f"took {seconds:.1f} s"


def test_serve_unreachable_address_fails_fast_naming_it(tmp_path):
    # The model is only checked to exist before connecting; the connection fails first.
    result, seconds = run_coserve("serve", "--model", str(tmp_path), "--ray-address", UNREACHABLE)
    assert result.returncode == 2, result.stderr
    assert f"'{UNREACHABLE}'" in result.stderr and "does not answer" in result.stderr
    assert seconds < 30, f"took {seconds:.1f} s"


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp13"], "dtype must be one of"),
    (["--max-lora-rank", "0"], "max_lora_rank must be a positive integer"),
    (["--lora-modules", "sql"], "NAME=PATH"),
    (["--lora-modules", "sql=/no/such/adapter"], "is not a directory"),
])
def test_serve_bad_options_fail_before_ray(tmp_path, args, message):
    result, _ = run_coserve("serve", "--model", str(tmp_path), "--ray-address", UNREACHABLE, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "does not answer" not in result.stderr


def test_serve_missing_model(tmp_path):
    result, _ = run_coserve("serve", "--model", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "nope" in result.stderr


def test_dashboard_url_as_ray_address_is_explained(tmp_path):
    result, _ = run_coserve("serve", "--model", str(tmp_path), "--ray-address", "http://127.0.0.1:8265")
    assert result.returncode == 2
    assert "dashboard" in result.stderr and "HOST:PORT" in result.stderr


# ---- progress display and cancel, in process with a scripted job (no Ray) ----------------------------


class ScriptedJob:
    """Returns the given controller job records one per poll, then the last one forever."""

    job_id = "ftjob-test"

    def __init__(self, records):
        self.records, self.cancelled = list(records), False

    def progress(self):
        return dict(self.records.pop(0) if len(self.records) > 1 else self.records[0])

    def cancel(self):
        self.cancelled = True
        self.records = [dict(self.records[-1], status="cancelled")]
        return True

    def wait(self, timeout=None):
        return self.progress()["status"]


class NoStats:
    def stats(self):
        raise RuntimeError("no stats here")   # tokens/s then shows "n/a"


def record(step, status="running", attempts=1, worker="worker-0", error=None):
    losses = [round(5.0 - 0.25 * i, 4) for i in range(step)]
    return dict(step=step, losses=losses, status=status, attempts=attempts, worker=worker, error=error,
                adapter="a", output_dir="/out/a", engine_job_id="e1")


def follow(records, capsys, signal_first=False):
    from coserve import cli_cluster

    stop = cli_cluster._StopSignals()
    if signal_first:
        stop.signum = 2
    job = ScriptedJob(records)
    code = cli_cluster._follow(NoStats(), job, max_steps=4, stop=stop)
    return code, job, capsys.readouterr()


def test_each_step_is_printed_once_also_across_a_restart(monkeypatch, capsys):
    monkeypatch.setattr("coserve.cli_cluster.POLL_S", 0.0)
    code, _, out = follow([record(0), record(2), record(2), record(1, attempts=2, worker="worker-1"),
                           record(4, status="succeeded", attempts=2, worker="worker-1")], capsys)
    assert code == 0
    lines = out.out.splitlines()
    assert lines[:2] == ["step 1/4 loss 5.0000 tokens/s n/a worker worker-0",
                         "step 2/4 loss 4.7500 tokens/s n/a worker worker-0"]
    assert "restarted on worker-1 at step 1" in lines[2]
    assert lines[3:6] == [f"step {s}/4 loss {5.0 - 0.25 * (s - 1):.4f} tokens/s n/a worker worker-1" for s in (2, 3, 4)]
    assert lines[6].startswith("job ftjob-test succeeded: adapter 'a' saved to /out/a")


def test_failed_job_exits_1_with_its_error(monkeypatch, capsys):
    monkeypatch.setattr("coserve.cli_cluster.POLL_S", 0.0)
    code, _, out = follow([record(1), record(1, status="failed", error="DatasetError: row 3")], capsys)
    assert code == 1
    assert "job ftjob-test failed at step 1: DatasetError: row 3" in out.err


def test_a_signal_cancels_the_job(capsys):
    code, job, out = follow([record(1)], capsys, signal_first=True)
    assert code == 130 and job.cancelled
    assert out.out.splitlines() == ["job ftjob-test: SIGINT received, cancelling", "job ftjob-test cancelled"]
