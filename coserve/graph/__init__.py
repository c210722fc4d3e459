"""The static graph pass: rewrite the model's module graph once, before serving.

Each pass is a function that edits the model in place and returns a report, so
the runtime has no branches for features and each pass is testable alone
(DESIGN section 4). The pipeline, in order:

1. inject_adapters: wrap target nn.Linear layers in MultiLoRALinear.
2. prune_backward: what finetuning keeps for its backward, and its bytes per token.
3. apply_pruning, swap_sparse, shard: later passes, added with the issues that need them.
"""
from coserve.graph.inject_adapters import InjectReport, inject_adapters
from coserve.graph.prune_backward import PruneReport, prune_backward

__all__ = ["InjectReport", "inject_adapters", "PruneReport", "prune_backward"]
