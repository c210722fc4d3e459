"""The iteration budget: from the TPOT SLO and a latency profile, or in tokens without an SLO.

With `tpot_slo_ms`, the engine profiles iteration latency at start-up (or
loads the saved profile named by `latency_profile`); inference is scheduled
first (a prompt's chunk beside running decodes is cut to the SLO, see
`Scheduler._iteration_token_budget`) and finetuning is added only while the
iteration's predicted latency stays under the SLO (the prediction is refitted
online from measured iterations, see `cost_model.py`). Without an SLO the budget
is `max_num_batched_tokens` forward tokens, a backward token counting as
several (`DEFAULT_BACKWARD_TOKEN_RATIO`). Temporal sharing uses the profile
too: a turn's K tokens count backward work, its windows' fixed cost included,
in forward tokens.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass

from coserve.engine.cost_model import MAX_SCALE, MIN_SCALE, CostModel, IterationShape
from coserve.engine.profiler import measure_scale, profile_latency

logger = logging.getLogger(__name__)


@dataclass
class Budget:
    cost_model: CostModel
    limit: float
    tpot_slo_ms: float | None
    profile: dict | None

    def to_dict(self, scheduler) -> dict:
        return {"tpot_slo_ms": self.tpot_slo_ms, "unit": self.cost_model.unit, "limit": self.limit,
                "inference_token_budget": scheduler.inference_token_budget,
                "max_forward_tokens": self.cost_model.max_forward_tokens(self.limit),
                "max_backward_tokens": self.cost_model.max_backward_tokens(self.limit),
                "sharing": scheduler.config.sharing, "latency_scale": self.cost_model.scale,
                "finetune_slo_headroom": scheduler.config.finetune_slo_headroom,
                "coefficients": self.cost_model.as_dict_ms(), "margin": self.cost_model.margin}


def configure_budget(engine) -> Budget:
    config = engine.config
    needs_profile = config.tpot_slo_ms is not None or config.sharing == "temporal"
    profile, loaded = _measured_profile(engine) if needs_profile else (None, False)
    if config.sharing == "temporal":
        # A turn's K tokens count backward work in forward tokens, its windows' fixed cost included.
        engine.scheduler.set_turn_costs(CostModel.from_dict(profile).in_token_units())
    if config.tpot_slo_ms is None:
        budget = Budget(CostModel.token_units(), float(config.max_num_batched_tokens), None, None)
    else:
        cost_model = CostModel.from_dict(profile)
        if loaded:
            forward_points = (profile.get("points") or {}).get("forward")
            cost_model.scale = min(MAX_SCALE, max(MIN_SCALE, measure_scale(engine, cost_model, forward_points)))
            logger.info("latency profile %s loaded; measured scale %.2f", config.latency_profile, cost_model.scale)
        budget = Budget(cost_model, config.tpot_slo_ms / 1000.0, config.tpot_slo_ms, profile)
        if budget.cost_model.max_forward_tokens(budget.limit) < 1:
            logger.warning("tpot_slo_ms=%s is below the latency of a one-token iteration (%.1f ms); "
                           "inference runs one token per iteration and finetuning gets no budget",
                           config.tpot_slo_ms, 1e3 * budget.cost_model.predict(IterationShape(prefill_tokens=1)))
    engine.scheduler.set_budget(budget.cost_model, budget.limit)
    return budget


def _measured_profile(engine) -> tuple[dict, bool]:
    """The latency profile (loaded from `latency_profile` if saved there, else measured now and saved)
    and whether it was loaded."""
    path = engine.config.latency_profile
    profile = _load_profile(path)
    if profile is not None:
        return profile, True
    profile = profile_latency(engine)
    if path:
        _save_profile(path, profile)
    return profile, False


def _load_profile(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _save_profile(path: str, profile: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=2)
    os.replace(tmp, path)
