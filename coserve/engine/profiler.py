"""Measure iteration latency against token count by kind, and fit the cost model.

Runs at engine start-up when an SLO is set: forward iterations of n prefill
tokens, finetuning forwards of n tokens and backward windows of n finetuning
tokens (rank-16 LoRA on every linear), each timed a few times after a warm-up,
the median kept. Backward windows are timed at a sequence's start and at its
end, where they attend to every earlier token. A straight line through each
kind's points (for backward, a plane: tokens and the keys they attend to) gives
the prior of `CostModel` (which the engine then refits online); the raw points
are kept for the dashboard.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from coserve.engine.cost_model import CostModel, keys_attended
from coserve.engine.latency_fit import solve
from coserve.engine.outputs import ScheduledSequence, SchedulerOutput
from coserve.finetune.trainable import TrainableLoRA
from peft_methods.lora.config import LoRAAdapterConfig

logger = logging.getLogger(__name__)

FORWARD_SIZES = (16, 64, 128, 256, 512)
BACKWARD_SIZES = (16, 64, 128, 256)
LATE_BACKWARD_SIZES = (16, 64, 128)
"""Windows timed at the end of a sequence as long as the longest profiled forward."""
_REPEATS = 5
_PROFILE_ID = "__latency_profile__"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope, the slope kept positive."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    slope = max(slope, 1e-9)
    return max(0.0, mean_y - slope * mean_x), slope


def _fit_backward(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """(base, per token, per key) of window latency from (tokens, start, seconds) points; least
    squares, falling back to a line in tokens when the plane's key term comes out negative."""
    rows = [(1.0, float(n), float(keys_attended(n, start))) for n, start, _ in points]
    xtx = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    xty = [sum(r[i] * y for r, (_, _, y) in zip(rows, points)) for i in range(3)]
    try:
        base, per_token, per_key = solve(xtx, xty)
    except ValueError:
        per_key = -1.0
    if per_key < 0 or per_token <= 0 or base < 0:
        base, per_token = _fit([(n, y) for n, _, y in points])
        return base, per_token, 0.0
    return base, per_token, per_key


def profile_latency(engine) -> dict:
    """Time forward and backward iterations on `engine` (idle); returns the profile dict."""
    sizes_f = [n for n in FORWARD_SIZES if n < engine.max_model_len]
    sizes_b = [n for n in BACKWARD_SIZES if n < engine.max_model_len]
    longest = max(sizes_f + sizes_b)
    sizes_late = [n for n in LATE_BACKWARD_SIZES if n < longest]
    block_manager = engine.block_manager
    if not block_manager.can_allocate(_PROFILE_ID, longest):
        raise RuntimeError("the KV cache is too small to profile iteration latency")
    block_manager.allocate(_PROFILE_ID, longest)
    executor = engine.runner.finetune
    lora = TrainableLoRA.initialize(LoRAAdapterConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                                    engine.adapters.layers, seed=0, device=engine.device)
    try:
        blocks = block_manager.block_ids(_PROFILE_ID)
        vocab = engine.model.config.vocab_size
        forward = [(n, _time_forward(engine, blocks, n, vocab)) for n in sizes_f]
        train = [(n, _time_train_forward(engine, executor, lora, blocks, n, vocab)) for n in sizes_b]
        # NOTE: each start-of-sequence window gets a sequence of its own length (its forward is the
        # profile's, not a longer one's); the end-of-sequence windows share one `longest` sequence.
        backward = [point for n in sizes_b
                    for point in _time_backward_windows(engine, executor, lora, blocks, n, [n], vocab, False)]
        late = _time_backward_windows(engine, executor, lora, blocks, longest, sizes_late, vocab, True)
    finally:
        block_manager.free(_PROFILE_ID)
        executor.release(_PROFILE_ID)
    forward_base, forward_per_token = _fit(forward)
    backward_base, backward_per_token, backward_per_key = _fit_backward(
        [(n, 0, t) for n, t in backward] + [(n, longest - n, t) for n, t in late])
    _, train_per_token = _fit(train)
    profile = CostModel(forward_base, forward_per_token, backward_base, backward_per_token,
                        train_forward_per_token=train_per_token, backward_per_key=backward_per_key).to_dict()
    profile["points"] = {"forward": forward, "train_forward": train, "backward": backward,
                         "late_backward": {"sequence_length": longest, "points": late}}
    logger.info("latency profile: forward %.2f ms + %.3f ms/token (finetuning %.3f ms/token), "
                "backward %.2f ms + %.3f ms/token + %.3f us/key", 1e3 * forward_base, 1e3 * forward_per_token,
                1e3 * train_per_token, 1e3 * backward_base, 1e3 * backward_per_token, 1e6 * backward_per_key)
    return profile


CALIBRATION_TOKENS = 32


def measure_scale(engine, cost_model: CostModel, forward_points: list | None = None) -> float:
    """Measured over profiled latency of a small forward now: the starting `scale` for a profile
    loaded from a file (it may come from another machine, or from a moment of contention).

    With the profile's measured `forward_points` ((tokens, seconds) pairs), the forward timed is
    the profiled size nearest `CALIBRATION_TOKENS` and the scale is the ratio of the two times.
    The fitted line is only the fallback: it can run below small forwards (the weights are read
    whatever the token count), and with it two bench-small profiles read the machine that had
    just measured them as 1.3 and 1.45x slower (32 tokens).
    """
    points = [(int(n), float(t)) for n, t in forward_points or () if 0 < n < engine.max_model_len and t > 0]
    if points:
        n, predicted = min(points, key=lambda point: (abs(point[0] - CALIBRATION_TOKENS), point[0]))
    else:
        n = min(CALIBRATION_TOKENS, engine.max_model_len - 1)
        predicted = cost_model.forward_base + cost_model.forward_per_token * n   # the profile, unscaled
    block_manager = engine.block_manager
    if not block_manager.can_allocate(_PROFILE_ID, n):
        return 1.0
    block_manager.allocate(_PROFILE_ID, n)
    try:
        seconds = _time_forward(engine, block_manager.block_ids(_PROFILE_ID), n, engine.model.config.vocab_size)
    finally:
        block_manager.free(_PROFILE_ID)
    return seconds / predicted if predicted > 0 else 1.0


def _prefill(n: int, blocks: list[int], vocab: int, training: bool) -> ScheduledSequence:
    tokens = [(7 * i + 3) % vocab for i in range(n)]
    return ScheduledSequence(_PROFILE_ID, tokens, 0, blocks, None, needs_sample=not training, is_training=training)


def _median_time(fn, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(_REPEATS):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_forward(engine, blocks: list[int], n: int, vocab: int) -> float:
    engine.runner.add_request(_PROFILE_ID, _profile_sampling())
    try:
        output = SchedulerOutput(sequences=[_prefill(n, blocks, vocab, training=False)])
        return _median_time(lambda: engine.runner.execute(output), engine.device)
    finally:
        engine.runner.remove_request(_PROFILE_ID)


def _time_train_forward(engine, executor, lora, blocks: list[int], n: int, vocab: int) -> float:
    """A finetuning forward of n tokens: the forward plus the loss and its gradient at the logits."""
    output = SchedulerOutput(sequences=[_prefill(n, blocks, vocab, training=True)])

    def run() -> None:
        executor.register(_PROFILE_ID, [(5 * i + 1) % vocab for i in range(n)], lora, 1.0 / n)
        try:
            engine.runner.execute(output)
        finally:
            executor.release(_PROFILE_ID)

    # NOTE: registering and releasing the sequence are a small part of each timed run.
    return _median_time(run, engine.device)


def _time_backward_windows(engine, executor, lora, blocks: list[int], length: int, sizes: list[int],
                           vocab: int, at_end: bool) -> list[tuple[int, float]]:
    """(n, seconds) of backward windows of n tokens of one `length`-token training sequence, each
    at its start ([0, n)) or at its end ([length - n, length), attending to all of it)."""
    if not sizes:
        return []
    executor.register(_PROFILE_ID, [(5 * i + 1) % vocab for i in range(length)], lora, 1.0 / length)
    try:
        engine.runner.execute(SchedulerOutput(sequences=[_prefill(length, blocks, vocab, training=True)]))
        spans = [(length - n, length) if at_end else (0, n) for n in sizes]
        return [(end - start, _median_time(lambda s=start, e=end: executor.backward(_PROFILE_ID, s, e, blocks),
                                           engine.device)) for start, end in spans]
    finally:
        executor.release(_PROFILE_ID)
        for param in lora.parameters():
            param.grad = None


def _profile_sampling():
    from coserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0)
