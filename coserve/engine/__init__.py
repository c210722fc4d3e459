"""The co-serving engine core. One iteration flows through these files:

    Request (request.py)                      a sequence that needs N more tokens of work
      -> Scheduler.schedule() (scheduler.py)  token budget: decodes, prefill chunks, new requests;
                                              KV blocks from BlockManager (kv_cache.py)
      -> SchedulerOutput (outputs.py)         plain Python, the only thing the runner receives
      -> ModelRunner.execute() (runner.py)    ModelInput tensors, adapter slots (adapter_manager.py),
                                              one fused forward, Sampler (sampler.py)
      -> RunnerOutput (outputs.py)
      -> Scheduler.update()                   tokens appended, stops checked, blocks freed
      -> Engine (engine.py)                   stop strings (detokenizer.py), stats (stats.py)

`Engine.step()` runs that once; `EngineLoop` (loop.py) drives it on a thread.
"""
