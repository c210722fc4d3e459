"""The engine freezes the heap that exists before it, and its own objects stay collectable."""
import gc
import weakref

from coserve.config import EngineConfig
from coserve.engine.engine import Engine


class _Marker:
    pass


def test_engine_freezes_the_existing_heap_and_is_collected_when_dropped(tiny_llama_dir):
    older = _Marker()                     # alive before the engine: frozen with the imported heap
    engine = Engine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu", num_kv_blocks=8))
    frozen = gc.get_freeze_count()
    assert frozen > 0
    model = weakref.ref(engine.model)
    assert not any(obj is older for obj in gc.get_objects())   # frozen objects are no longer tracked
    # The model's LoRA layers and their shared shrink refer to each other: only the collector frees them.
    del engine
    gc.collect()
    assert model() is None
