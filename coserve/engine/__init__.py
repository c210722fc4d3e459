"""The co-serving engine core. One iteration flows through these files:

    Request (request.py)                      a sequence that needs N more tokens of work
    TrainingSequence (training_sequence.py)   a finetuning sequence: forward chunks, then backward windows
      -> Scheduler.schedule() (scheduler.py)  budget from the cost model (cost_model.py, budget.py,
                                              profiler.py, latency_fit.py): decodes, prefill chunks, new requests, then
                                              finetuning work in what is left (finetune_planner.py);
                                              KV blocks from BlockManager (kv_cache.py)
      -> SchedulerOutput (outputs.py)         plain Python, the only thing the runner receives
      -> ModelRunner.execute() (runner.py)    ModelInput tensors, adapter slots (adapter_manager.py),
                                              one fused forward, Sampler (sampler.py), finetuning rows'
                                              activations and losses (coserve/finetune/executor.py)
      -> backward windows                     coserve/finetune/backward.py, via FinetuneManager
      -> RunnerOutput (outputs.py)
      -> Scheduler.update()                   tokens appended, stops checked, blocks freed
      -> Engine (engine.py)                   stop strings (detokenizer.py), stats (stats.py), the
                                              measured latency into the cost model, optimizer steps
                                              and checkpoints (coserve/finetune/manager.py)

`Engine.step()` runs that once; `EngineLoop` (loop.py) drives it on a thread.
"""
