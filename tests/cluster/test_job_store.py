"""JobStore: the controller's SQLite job table survives a restart and concurrent writers."""
import pickle
import sqlite3
import threading

import pytest

from cluster.job_store import JobRecord, JobStore


def record(job_id, status="queued", **fields):
    return JobRecord(job_id=job_id, adapter=f"ad-{job_id}", config=pickle.dumps({"job": job_id}),
                     status=status, **fields)


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_add_get_all_in_creation_order(store):
    for job_id in ("j3", "j1", "j2"):
        store.add(record(job_id))
    assert [r.job_id for r in store.all()] == ["j3", "j1", "j2"]
    got = store.get("j1")
    assert got == record("j1", created_at=got.created_at, updated_at=got.updated_at)
    assert pickle.loads(got.config) == {"job": "j1"}
    assert store.get("missing") is None


def test_duplicate_id_rejected(store):
    store.add(record("j1"))
    with pytest.raises(ValueError, match="'j1' already exists"):
        store.add(record("j1", status="running"))
    assert store.get("j1").status == "queued"


def test_update_sets_fields_and_bumps_updated_at(store):
    store.add(record("j1", created_at=100.0, updated_at=100.0))
    new = store.update("j1", status="running", worker="w0", engine_job_id="e7", step=3,
                       losses=[2.5, 2.25, 2.0], attempts=1)
    assert new.updated_at > 100.0 and new.created_at == 100.0
    assert store.get("j1") == new


def test_update_errors_are_clear(store):
    store.add(record("j1"))
    with pytest.raises(KeyError, match="no job 'nope'"):
        store.update("nope", status="running")
    with pytest.raises(ValueError, match="'stpe'"):
        store.update("j1", stpe=3)
    with pytest.raises(ValueError, match="'job_id'"):
        store.update("j1", job_id="j2")
    with pytest.raises(ValueError, match="'created_at'"):
        store.update("j1", created_at=0.0)
    with pytest.raises(ValueError, match="status must be one of"):
        store.update("j1", status="done")
    assert store.get("j1").status == "queued"  # failed updates changed nothing


def test_survives_close_and_reopen_with_all_fields(tmp_path):
    path = tmp_path / "deploy" / "jobs.sqlite"
    path.parent.mkdir()
    first = JobStore(path)
    first.add(record("done", status="queued"))
    first.add(record("run"))
    first.add(record("wait"))
    first.update("done", status="failed", worker="w1", engine_job_id="e1", output_dir="/out/done",
                 step=7, losses=[3.0, float("nan"), 1.5], error="CUDA OOM", attempts=2)
    first.update("run", status="running", worker="w0", step=2, losses=[1.0, 0.5], attempts=1)
    before = first.all()
    first.close()  # the controller dies here

    second = JobStore(path)  # the restarted controller
    try:
        after = second.all()
        assert [r.job_id for r in after] == ["done", "run", "wait"]
        for old, new in zip(before, after):
            assert repr(old) == repr(new)  # repr: NaN != NaN, but reprs match
        failed = second.get("done")
        assert (failed.worker, failed.engine_job_id, failed.output_dir, failed.error) == \
               ("w1", "e1", "/out/done", "CUDA OOM")
        assert failed.step == 7 and failed.attempts == 2 and failed.losses[0] == 3.0
        assert [r.job_id for r in second.unfinished()] == ["run", "wait"]
        second.add(record("new"))
        assert second.all()[-1].job_id == "new"
    finally:
        second.close()


def test_uses_wal_and_reopen_while_open(tmp_path):
    path = tmp_path / "jobs.sqlite"
    with JobStore(path) as a:
        a.add(record("j1"))
        with JobStore(path) as b:  # a second opener sees committed writes at once
            assert b.get("j1").adapter == "ad-j1"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_concurrent_updates_from_threads(tmp_path):
    path = tmp_path / "jobs.sqlite"
    num_threads, num_steps = 6, 25
    # Half the threads share one store object (the lock); the other half write
    # through a second connection to the same file (SQLite's own locking).
    stores = [JobStore(path), JobStore(path)]
    for t in range(num_threads):
        stores[0].add(record(f"j{t}"))
    errors = []

    def work(t):
        store = stores[t % 2]
        try:
            for step in range(1, num_steps + 1):
                store.update(f"j{t}", status="running", step=step, losses=[float(s) for s in range(step)])
                assert store.get(f"j{t}").step == step
                store.all()
            store.add(record(f"extra{t}"))
        except Exception as error:  # surfaced below: pytest does not see thread exceptions
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors
        for t in range(num_threads):
            got = stores[1].get(f"j{t}")
            assert got.status == "running" and got.step == num_steps
            assert got.losses == [float(s) for s in range(num_steps)]
        assert len(stores[0].all()) == 2 * num_threads
    finally:
        for store in stores:
            store.close()
