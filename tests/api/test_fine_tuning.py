"""/v1/fine_tuning/jobs end to end with the official `openai` client, errors over raw HTTP, cancel, restart.

The tiny random-weight llama is taught a few made-up facts in ChatML chat
rows; a high learning_rate_multiplier makes the loss fall within a few steps.
The succeeded job's `fine_tuned_model` must then be listed by /v1/models and
answer /v1/chat/completions at once.
"""
import json
import time

import httpx
import openai
import pytest

from coserve import LLM
from coserve.api.app import create_app
from coserve.api.backend import LocalBackend
from coserve.api.fine_tuning_request import (AUTO_N_EPOCHS, BASE_LEARNING_RATE, DEFAULT_LORA, finetune_config,
                                             plan_steps, resolve_hyperparameters)
from coserve.api.settings import ServerSettings
from tests.api.conftest import ENGINE, MODEL_ID, LiveServer

FACTS = [("What color is a zorb?", "Zorbs are teal."), ("Who built Blip?", "Blip was built by Quill."),
         ("Where is Vantor?", "Vantor is under the sea."), ("How old is Mox?", "Mox is nine.")]
ROWS = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q},
                      {"role": "assistant", "content": a}]} for q, a in FACTS] * 2
LORA = {"r": 16, "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# lr = 25 x 2e-4 = 5e-3; 10 steps, 2 per epoch. NOTE: measured by hand on this setup (seed 3): the loss
# falls about monotonically from 6.99 to 6.41; 10x higher rates jump around, lower ones barely move.
FAST = {"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 25}
TERMINAL = ("succeeded", "failed", "cancelled")


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_for(client, job_id, predicate, timeout=180.0):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"timed out waiting on {job_id}: {job.status}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


@pytest.fixture(scope="module")
def training_file(client):
    return client.files.create(file=("facts.jsonl", jsonl(ROWS)), purpose="fine-tune").id


@pytest.fixture(scope="module")
def finished_job(client, training_file):
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=training_file, hyperparameters=FAST,
                                         suffix="facts", seed=3, extra_body={"lora": LORA})
    assert job.status == "validating_files" and job.fine_tuned_model is None
    return created_and_finished(client, job)


def created_and_finished(client, job):
    return job, wait_for(client, job.id, lambda j: j.status in TERMINAL)


def test_job_trains_and_its_model_is_served(client, server, finished_job):
    created, job = finished_job
    assert created.id.startswith("ftjob-") and created.object == "fine_tuning.job"
    assert (created.model, created.training_file, created.seed) == (MODEL_ID, job.training_file, 3)
    assert created.hyperparameters.n_epochs == 5 and created.hyperparameters.batch_size == 4
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{MODEL_ID}:facts:{job.id[6:14]}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.error is None
    assert job.method.type == "supervised" and job.model_extra["lora"]["target_modules"] == LORA["target_modules"]

    # Listed by /v1/models with its adapter directory as root, and served by chat completions.
    models = {m.id: m for m in client.models.list()}
    output_dir = server.state.extras["fine_tuning"].get_record(job.id)["output_dir"]
    assert models[job.fine_tuned_model].model_extra["root"] == output_dir
    question = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": FACTS[0][0]}]
    tuned = client.chat.completions.create(model=job.fine_tuned_model, messages=question, max_tokens=12,
                                           temperature=0)
    base = client.chat.completions.create(model=MODEL_ID, messages=question, max_tokens=12, temperature=0)
    assert tuned.model == job.fine_tuned_model and tuned.choices[0].finish_reason in ("stop", "length")
    # NOTE: 10 steps cannot make a random-weight model recite its answers (the loss only falls from about
    # ln(vocab)); they do change what it says: the first thing it learns is to end its turn.
    assert base.choices[0].message.content != tuned.choices[0].message.content


def test_events_carry_one_falling_loss_per_step(client, finished_job):
    _, job = finished_job
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert all(e.object == "fine_tuning.job.event" for e in events)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)   # newest first
    metrics = [e for e in reversed(events) if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(1, 11))
    losses = [e.data["train_loss"] for e in metrics]
    assert losses[-1] < losses[0] - 0.25, losses
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.5, losses
    messages = [e.message for e in reversed(events)]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert "Fine-tuning job started" in messages and messages[-1] == "The job has successfully completed"

    # Pages follow `after`, newest first.
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert page.has_more and [e.id for e in page.data] == [e.id for e in events[:3]]
    nxt = httpx.get(f"{client.base_url}fine_tuning/jobs/{job.id}/events",
                    params={"after": page.data[-1].id, "limit": 2}).json()
    assert [e["id"] for e in nxt["data"]] == [e.id for e in events[3:5]]


def test_checkpoints_at_each_epoch_and_results_file(client, finished_job):
    _, job = finished_job
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [10, 8, 6, 4, 2]   # one per epoch, newest first
    losses = {e.data["step"]: e.data["train_loss"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
              if e.type == "metrics"}
    for c in checkpoints:
        assert c.object == "fine_tuning.job.checkpoint" and c.fine_tuning_job_id == job.id
        assert c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}"
        assert c.metrics.step == c.step_number and c.metrics.train_loss == losses[c.step_number]
    [result] = job.result_files
    assert client.files.retrieve(result).purpose == "fine-tune-results"
    lines = client.files.content(result).text.strip().splitlines()
    assert lines[0] == "step,train_loss" and len(lines) == 11


def test_jobs_list_newest_first_with_pages(client, training_file, finished_job):
    _, first = finished_job
    second = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=training_file,
                                            hyperparameters={"n_epochs": 1, "batch_size": 8})
    page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [second.id] and page.has_more
    ids = [j.id for j in client.fine_tuning.jobs.list(limit=1)]   # auto-paginates
    assert ids.index(second.id) < ids.index(first.id)
    done = wait_for(client, second.id, lambda j: j.status in TERMINAL)
    assert done.status == "succeeded" and done.fine_tuned_model.startswith(f"ft:{MODEL_ID}::")
    # "auto" learning rate multiplier and a base-rate job reported as resolved numbers.
    assert done.hyperparameters.learning_rate_multiplier == 1.0


def test_continue_from_a_fine_tuned_model(client, training_file, finished_job, server):
    _, parent = finished_job
    job = client.fine_tuning.jobs.create(model=parent.fine_tuned_model, training_file=training_file,
                                         hyperparameters={"n_epochs": 1, "batch_size": 8})
    assert wait_for(client, job.id, lambda j: j.status in TERMINAL).status == "succeeded"
    record = server.state.extras["fine_tuning"].get_record(job.id)
    assert record["init_adapter"] == server.state.extras["fine_tuning"].get_record(parent.id)["output_dir"]


def test_cancel_a_running_job(client, training_file, backend):
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=training_file,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    wait_for(client, job.id, lambda j: j.status == "running")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None and cancelled.finished_at
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert messages[0] == "The job was cancelled"
    name = f"ft:{MODEL_ID}::{job.id[6:14]}"
    assert name not in [m.id for m in client.models.list()] and name not in backend.list_adapters()

    response = httpx.post(f"{client.base_url}fine_tuning/jobs/{job.id}/cancel")
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_not_cancellable"


def test_cancel_while_validating_stops_the_engine_job(client, training_file, backend):
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=training_file,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    name = f"ft:{MODEL_ID}::{job.id[6:14]}"
    deadline = time.monotonic() + 30
    # Whether the engine job had started or not, nothing may keep training under that name.
    while any(j["adapter"] == name and j["status"] not in TERMINAL for j in backend.jobs()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert not any(j["adapter"] == name and j["status"] not in TERMINAL for j in backend.jobs())
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def post_job(server, body):
    return httpx.post(f"{server.url}/v1/fine_tuning/jobs", json=body)


@pytest.mark.parametrize("change, param", [
    ({"model": "gpt-4o-mini"}, "model"),
    ({"model": None}, "model"),
    ({"training_file": "file-" + "0" * 24}, "training_file"),
    ({"validation_file": "file-" + "0" * 24}, "validation_file"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "3"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 1.5}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
    ({"method": {"type": "dpo"}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 99}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"suffix": "has space"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"lora": {"lora_dropout": 0.1}}, "lora"),
    ({"lora": {"bogus": 1}}, "lora"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
    ({"loras": {}}, "loras"),
])
def test_bad_create_requests_name_the_field(server, training_file, change, param):
    body = {"model": MODEL_ID, "training_file": training_file, **change}
    response = post_job(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_files_of_another_purpose_are_refused(server, training_file):
    results = server.state.extras["files"].add(b"step,train_loss\n", "r.csv", "fine-tune-results")
    response = post_job(server, {"model": MODEL_ID, "training_file": results["id"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "training_file"
    assert response.json()["error"]["code"] == "invalid_file_purpose"


def test_malformed_json_and_unknown_jobs(server):
    response = httpx.post(f"{server.url}/v1/fine_tuning/jobs", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    unknown = "ftjob-" + "0" * 24
    for method, suffix in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/checkpoints")):
        for job_id in (unknown, "nope"):
            response = httpx.request(method, f"{server.url}/v1/fine_tuning/jobs/{job_id}{suffix}")
            assert response.status_code == 404, (method, suffix)
            assert response.json()["error"]["param"] == "fine_tuning_job_id"


def test_hyperparameters_map_to_the_engine_config():
    hp = resolve_hyperparameters({"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 2}, 50)
    assert hp == {"n_epochs": 3, "batch_size": 3, "learning_rate_multiplier": 2}   # auto: 50 // 16
    assert plan_steps(hp, 50) == (50, 17)                                            # ceil(3*50/3), ceil(50/3)
    auto = resolve_hyperparameters({n: "auto" for n in hp}, 8)
    assert auto == {"n_epochs": AUTO_N_EPOCHS, "batch_size": 1, "learning_rate_multiplier": 1.0}
    record = {"model_name": "ft:m::abc", "lora": {**DEFAULT_LORA, "r": 4}, "init_adapter": None, "max_steps": 50,
              "hyperparameters": hp, "max_seq_len": 128, "seed": 7, "output_dir": "/data/ft/x/adapter",
              "save_steps": 17}
    config = finetune_config(record, ROWS)
    assert config.learning_rate == pytest.approx(2 * BASE_LEARNING_RATE)
    assert (config.adapter, config.max_steps, config.batch_size, config.save_steps, config.seed) == (
        "ft:m::abc", 50, 3, 17, 7)
    assert config.peft.r == 4 and config.dataset is ROWS and config.resume_from_checkpoint is None
    assert finetune_config(record, ROWS, resume=True).resume_from_checkpoint is True


def test_jobs_and_files_survive_a_restart(make_server, tmp_path):
    first = make_server(data_dir=tmp_path)
    client = client_for(first)
    file_id = client.files.create(file=("facts.jsonl", jsonl(ROWS)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=file_id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 4}, suffix="kept")
    job = wait_for(client, job.id, lambda j: j.status in TERMINAL)
    assert job.status == "succeeded"
    events = [e.model_dump() for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    checkpoints = [c.model_dump() for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    first.state.extras["fine_tuning"].close()
    first.stop()

    second = make_server(data_dir=tmp_path)
    client = client_for(second)
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [file_id]
    assert client.fine_tuning.jobs.retrieve(job.id) == job
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert [e.model_dump() for e in client.fine_tuning.jobs.list_events(job.id, limit=100)] == events
    assert [c.model_dump() for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == checkpoints
    assert job.fine_tuned_model in [m.id for m in client.models.list()]


def test_an_unfinished_job_resumes_on_a_new_engine(make_server, backend, tiny_llama_dir, tmp_path):
    first = make_server(data_dir=tmp_path)
    client = client_for(first)
    file_id = client.files.create(file=("facts.jsonl", jsonl(ROWS)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=file_id, extra_body={"lora": LORA},
                                         hyperparameters={"n_epochs": 6, "batch_size": 2})
    wait_for(client, job.id, lambda j: len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 1)
    # The server "dies": its table stops changing and its engine job stops.
    record = first.state.extras["fine_tuning"].get_record(job.id)
    first.state.extras["fine_tuning"].close()
    first.stop()
    backend.cancel_job(record["backend_job_id"])

    fresh = LocalBackend(LLM(model=str(tiny_llama_dir), **ENGINE))
    second = LiveServer(create_app(fresh, ServerSettings(model_id=MODEL_ID, data_dir=tmp_path)))
    try:
        client = client_for(second)
        done = wait_for(client, job.id, lambda j: j.status in TERMINAL)
        assert done.status == "succeeded", done.error
        events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))
        assert any(e.message.startswith("The server restarted; resuming from the checkpoint at step")
                   for e in events)
        assert [e.data["step"] for e in events if e.type == "metrics"] == list(range(1, 25))
        assert done.fine_tuned_model in fresh.list_adapters()
    finally:
        second.state.extras["fine_tuning"].close()
        second.stop()
        fresh.shutdown()


def test_problems_found_while_starting_fail_the_job_with_an_error(client):
    # Token ids are range-checked against the model only when the engine prepares the job.
    out_of_vocab = client.files.create(file=("ids.jsonl", jsonl([{"input_ids": [1, 2, 10**7]}])),
                                       purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=out_of_vocab)
    failed = wait_for(client, job.id, lambda j: j.status in TERMINAL)
    assert failed.status == "failed" and failed.fine_tuned_model is None
    assert failed.error.code == "invalid_training_file" and failed.error.param == "training_file"
    assert "10000000" in failed.error.message
    events = list(client.fine_tuning.jobs.list_events(job.id))
    assert events[0].level == "error" and events[0].message.startswith("The job failed")

    good = client.files.create(file=("facts.jsonl", jsonl(ROWS)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=MODEL_ID, training_file=good,
                                         extra_body={"lora": {"target_modules": ["no_such_proj"]}})
    failed = wait_for(client, job.id, lambda j: j.status in TERMINAL)
    assert failed.status == "failed" and failed.error.code == "invalid_job", failed.error
    assert "target_modules" in failed.error.message
