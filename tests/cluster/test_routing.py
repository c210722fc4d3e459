"""Router policy on hand-made worker snapshots (no Ray, no engine)."""
from collections import Counter

import pytest

from cluster.routing import NoWorkerError, Router, WorkerLoad


def worker(name, role="coserve", healthy=True, adapters=(), queued=0, headroom=0.0, jobs=0):
    return WorkerLoad(name=name, role=role, healthy=healthy, adapters=frozenset(adapters),
                      queued_tokens=queued, finetune_headroom=headroom, running_jobs=jobs)


def draws(router, adapter, workers, n=2000):
    return Counter(router.choose_inference_worker(adapter, workers) for _ in range(n))


def test_affinity_picks_the_only_holder_even_if_busier():
    workers = [worker("a", queued=100), worker("b", adapters={"sql"}, queued=900), worker("c", queued=0)]
    assert draws(Router(overload_tokens=4096, seed=0), "sql", workers) == {"b": 2000}


def test_affinity_balances_between_holders():
    workers = [worker("a", adapters={"sql"}, queued=10), worker("b", adapters={"sql"}, queued=500),
               worker("c", queued=0)]
    # Power of two over two holders: always the less loaded one, never the non-holder.
    assert draws(Router(seed=1), "sql", workers) == {"a": 2000}


def test_overloaded_holder_is_skipped():
    workers = [worker("hot", adapters={"sql"}, queued=5000), worker("x", queued=0), worker("y", queued=10)]
    counts = draws(Router(overload_tokens=4096, seed=0), "sql", workers)
    assert counts["hot"] == 0
    assert counts["x"] > counts["y"] > 0  # load balancing over all candidates


def test_holder_exactly_at_the_overload_limit_still_qualifies():
    workers = [worker("hold", adapters={"sql"}, queued=4096), worker("idle", queued=0)]
    assert draws(Router(overload_tokens=4096, seed=0), "sql", workers, n=200) == {"hold": 200}


def test_base_model_load_balances_towards_less_loaded_and_skips_unhealthy():
    workers = [worker("light", queued=0), worker("mid", queued=1000), worker("heavy", queued=3000),
               worker("dead", healthy=False, queued=0)]
    counts = draws(Router(seed=0), None, workers, n=3000)
    assert counts["dead"] == 0
    # With 3 candidates, power of two picks the lightest 2/3 of the time, the middle 1/3, the heaviest never.
    assert counts["light"] > 1800 and counts["mid"] > 800 and counts["heavy"] == 0


def test_unknown_adapter_falls_back_to_load():
    workers = [worker("a", adapters={"x"}, queued=0), worker("b", queued=50)]
    counts = draws(Router(seed=0), "not-loaded", workers, n=500)
    assert counts["a"] == 500  # 2 candidates: power of two always takes the lighter


def test_inference_never_goes_to_finetune_role_or_unhealthy_holder():
    workers = [worker("ft", role="finetune", adapters={"sql"}), worker("sick", adapters={"sql"}, healthy=False),
               worker("inf", role="inference", queued=10_000)]
    assert draws(Router(seed=0), "sql", workers, n=300) == {"inf": 300}


def test_inference_without_candidates_explains():
    with pytest.raises(NoWorkerError, match="has role 'coserve' or 'inference'"):
        Router().choose_inference_worker(None, [worker("ft", role="finetune")])
    with pytest.raises(NoWorkerError, match="unhealthy"):
        Router().choose_inference_worker("x", [worker("a", healthy=False)])
    with pytest.raises(NoWorkerError):
        Router().choose_inference_worker(None, [])


def test_seed_makes_choices_reproducible():
    workers = [worker(f"w{i}", queued=i * 7) for i in range(6)]
    r1, r2 = Router(seed=3), Router(seed=3)
    picks = [r1.choose_inference_worker(None, workers) for _ in range(50)]
    assert picks == [r2.choose_inference_worker(None, workers) for _ in range(50)]
    assert len(set(picks)) > 1  # random, not always the single least-loaded worker


def test_finetune_picks_max_headroom_then_fewer_jobs_then_name():
    router = Router()
    workers = [worker("a", headroom=100.0, jobs=0), worker("b", headroom=300.0, jobs=2),
               worker("c", role="inference", headroom=999.0), worker("d", healthy=False, headroom=999.0)]
    assert router.choose_finetune_worker(workers) == "b"
    tied = [worker("z", headroom=200.0, jobs=1), worker("y", headroom=200.0, jobs=0),
            worker("x", role="finetune", headroom=200.0, jobs=0)]
    assert router.choose_finetune_worker(tied) == "x"


def test_finetune_honours_and_validates_requested_worker():
    router = Router()
    workers = [worker("big", headroom=500.0), worker("small", role="finetune", headroom=1.0),
               worker("inf", role="inference", headroom=900.0), worker("down", healthy=False)]
    assert router.choose_finetune_worker(workers, requested="small") == "small"
    with pytest.raises(NoWorkerError, match="no worker named 'nope'"):
        router.choose_finetune_worker(workers, requested="nope")
    with pytest.raises(NoWorkerError, match="'down' is unhealthy"):
        router.choose_finetune_worker(workers, requested="down")
    with pytest.raises(NoWorkerError, match="role 'inference'"):
        router.choose_finetune_worker(workers, requested="inf")


def test_finetune_without_candidates_explains():
    with pytest.raises(NoWorkerError, match="finetuning"):
        Router().choose_finetune_worker([worker("i", role="inference")])
    with pytest.raises(NoWorkerError, match="unhealthy"):
        Router().choose_finetune_worker([worker("c", healthy=False)])


def test_bad_role_and_overload_rejected():
    with pytest.raises(ValueError, match="role must be one of"):
        worker("w", role="trainer")
    with pytest.raises(ValueError, match="overload_tokens"):
        Router(overload_tokens=-1)
