"""The static graph pass: rewrite the model's module graph once, before serving.

Each pass is a function that edits the model in place and returns a report, so
the runtime has no branches for features and each pass is testable alone
(DESIGN section 4). The pipeline, in order:

1. inject_adapters: wrap target nn.Linear layers in MultiLoRALinear (now).
2. prune_backward, apply_pruning, swap_sparse, shard: later passes, added with
   the issues that need them.
"""
from coserve.graph.inject_adapters import InjectReport, inject_adapters

__all__ = ["InjectReport", "inject_adapters"]
