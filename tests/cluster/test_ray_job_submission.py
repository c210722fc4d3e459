"""`coserve serve` and `coserve finetune` as Ray jobs on a real `ray start --head` cluster.

The path a user takes: start a head, `ray job submit --no-wait -- coserve serve`,
wait for its ready line, submit `coserve finetune job.yaml` with a working dir,
read the job's status and logs (the CLI and `JobSubmissionClient`), then
`ray job stop` the server, which must shut the deployment down.

The head is this module's own: free ports and its own --temp-dir, so no other
Ray instance on the machine finds it (ray.init() looks for the address file in
the default temp dir), and it is stopped by signalling its `ray start --block`
process rather than `ray stop`, which would kill every Ray process on the
machine. A first test runs `coserve serve` on an embedded local Ray instead
and stops it with Ctrl-C (before the head starts). Run with
`pytest -m ray_cluster` (deselected by default).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray_cluster

VENV_BIN = Path(sys.executable).parent
RAY, COSERVE = str(VENV_BIN / "ray"), str(VENV_BIN / "coserve")
START_TIMEOUT_S = 120      # head up and answering the job API
READY_TIMEOUT_S = 240      # `coserve serve` job: driver imports, worker loads the tiny model
JOB_TIMEOUT_S = 300
# Ray SIGKILLs a stopped job's entrypoint after RAY_JOB_STOP_WAIT_TIME_S (default 3 s, read by the job's
# supervisor, which gets the job's runtime_env); Python's own exit after the shutdown can take longer than that.
SERVE_RUNTIME_ENV = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.]+) tokens/s (\S+) worker (\S+)$", re.M)

# On the tiny random model these settings make the loss fall clearly within a few steps (lr 1e-2, repeated rows).
JOB_YAML = """\
adapter: {adapter}
dataset: data/train.jsonl
peft:
  r: 4
  lora_alpha: 8
  target_modules: [q_proj, v_proj]
max_steps: 8
batch_size: 2
learning_rate: 1e-2
shuffle: false
max_seq_len: 64
"""
ROWS = [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "coserve trains while it serves"}] * 4


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Head:
    """A `ray start --head --block` process and the addresses and environment to reach it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # Token auth either way: once ~/.ray/auth_token exists a new head requires it, so always have one.
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="token")
        self.env = env
        token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                               check=True, timeout=60).stdout.strip()
        self.headers = {"Authorization": f"Bearer {token}"}
        ports = free_ports(9)
        self.gcs_address = f"127.0.0.1:{ports[0]}"
        self.dashboard = f"http://127.0.0.1:{ports[1]}"
        # NOTE: short path: Ray's Unix sockets live under the temp dir and have a length limit.
        self.temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
        self.log = open(root / "head.log", "w")
        self.process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={self.temp_dir}",
             f"--port={ports[0]}", f"--dashboard-port={ports[1]}", f"--ray-client-server-port={ports[2]}",
             f"--dashboard-agent-listen-port={ports[3]}", f"--dashboard-agent-grpc-port={ports[4]}",
             f"--metrics-export-port={ports[5]}", f"--runtime-env-agent-port={ports[6]}",
             f"--node-manager-port={ports[7]}", f"--object-manager-port={ports[8]}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = self._wait_for_job_api()

    def _wait_for_job_api(self):
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.process.returncode}): {self.head_log()}")
            try:
                return JobSubmissionClient(self.dashboard, headers=self.headers)
            except Exception:   # not up yet (the client checks the server's version on creation)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no job API at {self.dashboard} after {START_TIMEOUT_S} s: "
                                       f"{self.head_log()}") from None
                time.sleep(1.0)

    def head_log(self) -> str:
        self.log.flush()
        return (self.root / "head.log").read_text()[-3000:]

    def ray(self, command: str, *args, timeout=JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        """`ray job COMMAND --address DASHBOARD ARGS...` (the address must come before `--`)."""
        return subprocess.run([RAY, "job", command, "--address", self.dashboard, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def coserve(self, *args, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run([COSERVE, *args], env=self.env, capture_output=True, text=True, timeout=120, cwd=cwd)

    def stop(self) -> None:
        """SIGTERM to `ray start --block` stops this head's processes; SIGKILL to its group catches stragglers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:   # its own session (start_new_session): the group holds only this head's processes
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = Head(tmp_path_factory.mktemp("ray-head"))
    try:
        yield head
    finally:
        head.stop()


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def terminal_status(head: Head, job_id: str, timeout_s: float = JOB_TIMEOUT_S):
    def ended():
        status = head.client.get_job_status(job_id)
        return status if status.is_terminal() else None

    return wait_for(ended, timeout_s, f"job {job_id} to end", poll_s=0.5)


def write_job_dir(root: Path, adapter: str) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "job.yaml").write_text(JOB_YAML.format(adapter=adapter))
    return root


def test_serve_on_embedded_ray_stops_cleanly_on_ctrl_c(tiny_llama_dir, tmp_path):
    """No address and no RAY_ADDRESS: a local Ray instance of its own, gone again after SIGINT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "serve.out"
    with open(out, "w") as stdout:
        process = subprocess.Popen([COSERVE, "serve", "--name", "embedded", "--model", str(tiny_llama_dir),
                                    "--dtype", "float32", "--port", "0", "--directory", str(tmp_path / "deployment")],
                                   env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
        try:
            def ready():
                assert process.poll() is None, f"serve exited ({process.returncode}): {process.stderr.read()}"
                return "ready: 1 worker(s)" in out.read_text()

            wait_for(ready, READY_TIMEOUT_S, "the ready line", poll_s=0.5)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0, process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert out.read_text().splitlines()[-2:] == ["coserve deployment 'embedded': SIGINT received, shutting down",
                                                 "coserve deployment 'embedded' stopped"]


def test_serve_and_finetune_as_ray_jobs(head, tiny_llama_dir, tmp_path):
    from ray.job_submission import JobStatus

    name = f"rayjob-{uuid.uuid4().hex[:8]}"
    serve_id, finetune_id, reuse_id = f"serve-{name}", f"finetune-{name}", f"reuse-{name}"
    submitted = head.ray("submit", "--no-wait", "--submission-id", serve_id,
                         "--runtime-env-json", json.dumps(SERVE_RUNTIME_ENV), "--",
                         COSERVE, "serve", "--workers", "1", "--name", name, "--model", str(tiny_llama_dir),
                         "--dtype", "float32", "--no-gpu", "--max-num-batched-tokens", "64", "--port", "0",
                         "--directory", str(tmp_path / "deployment"))
    assert submitted.returncode == 0, submitted.stderr
    try:
        def ready():
            status = head.client.get_job_status(serve_id)
            logs = head.client.get_job_logs(serve_id)
            assert not status.is_terminal(), f"serve job ended ({status}):\n{logs}"
            return re.search(rf"coserve deployment '{name}' ready: 1 worker\(s\) \[worker-0 on cpu", logs)

        wait_for(ready, READY_TIMEOUT_S, "the ready line of `coserve serve`")

        # A blocking `ray job submit`: the YAML and its dataset travel in the working dir.
        job_dir = write_job_dir(tmp_path / "job", adapter=f"{name}-lora")
        result = head.ray("submit", "--submission-id", finetune_id, "--working-dir", str(job_dir), "--",
                          COSERVE, "finetune", "job.yaml", "--deployment", name)
        logs = head.client.get_job_logs(finetune_id)
        assert result.returncode == 0, f"{result.stderr}\n{logs}"
        assert f"Job '{finetune_id}' succeeded" in head.ray("status", finetune_id).stdout   # the CLI's words
        assert head.client.get_job_status(finetune_id) == JobStatus.SUCCEEDED
        steps = [(int(s), int(n), float(loss), worker) for s, n, loss, _, worker in STEP_LINE.findall(logs)]
        assert [s for s, *_ in steps] == list(range(1, 9)), logs
        assert all(n == 8 and worker == "worker-0" for _, n, _, worker in steps), logs
        losses = [loss for _, _, loss, _ in steps]
        assert losses[-1] < losses[0] - 0.05, f"loss did not fall: {losses}"
        assert f"adapter '{name}-lora' saved to" in logs and head.ray("logs", finetune_id).stdout.count("step ") >= 8

        # Submitted with JobSubmissionClient: the same adapter name again is refused (exit 2 -> FAILED).
        head.client.submit_job(submission_id=reuse_id, runtime_env={"working_dir": str(job_dir)},
                               entrypoint=f"{COSERVE} finetune job.yaml --deployment {name}")
        assert terminal_status(head, reuse_id) == JobStatus.FAILED
        reuse_logs = head.client.get_job_logs(reuse_id)
        assert f"adapter name '{name}-lora' is already in use" in reuse_logs, reuse_logs

        # From outside the cluster, by GCS address: an unknown name lists the running deployment.
        unknown = head.coserve("finetune", "job.yaml", "--deployment", "no-such-name",
                               "--ray-address", head.gcs_address, cwd=job_dir)
        assert unknown.returncode == 2, unknown.stderr
        assert "no coserve deployment named 'no-such-name'" in unknown.stderr and name in unknown.stderr

        # `ray job stop` sends SIGTERM: the deployment shuts down and the job ends STOPPED.
        stopped = head.ray("stop", serve_id)
        assert stopped.returncode == 0, stopped.stderr
        assert terminal_status(head, serve_id, timeout_s=120) == JobStatus.STOPPED
        serve_logs = head.client.get_job_logs(serve_id)
        assert f"coserve deployment '{name}': SIGTERM received, shutting down" in serve_logs, serve_logs
        assert f"coserve deployment '{name}' stopped" in serve_logs, serve_logs
        gone = head.coserve("finetune", "job.yaml", "--deployment", name, "--ray-address", head.gcs_address,
                            cwd=job_dir)
        assert gone.returncode == 2 and "none is running" in gone.stderr, gone.stderr
    finally:
        if not head.client.get_job_status(serve_id).is_terminal():
            head.client.stop_job(serve_id)
            terminal_status(head, serve_id, timeout_s=120)

