"""AdapterManager and the inject_adapters pass, judged against HF transformers + peft.

A tiny LlamaForCausalLM (fp64, hidden 64, 2 layers) is injected with all-linear
MultiLoRALinear layers; adapters made by real peft (random non-zero B) are
registered and activated, and the logits must equal the peft model's, alone and
in a mixed-adapter batch (peft's own `adapter_names=` mixed batch is the
reference). Also the CPU and device-slot LRU, and every error path.
"""
import copy
import shutil

import pytest
import torch
from peft import PeftModel

from coserve.engine.adapter_manager import AdapterManager, UnknownAdapterError
from coserve.graph import inject_adapters
from peft_methods.lora.config import LoRAAdapterConfig
from peft_methods.lora.layer import LoRABatch, LoRAContext, MultiLoRALinear
from peft_methods.lora.weights import AdapterLoadError, LoRAAdapter, load_adapter, save_adapter
from tests.helpers import make_peft_adapter, tiny_hf_llama

ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=4, lora_alpha=16, target_modules="all-linear",
                rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3}),
    "rs": dict(r=3, lora_alpha=6, target_modules=r".*\.(k_proj|o_proj|gate_proj)", use_rslora=True),
}
BATCH, SEQ = 3, 5


@pytest.fixture(scope="module")
def base():
    return tiny_hf_llama()


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    peft_models = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        peft_models[name] = make_peft_adapter(base, root / name, seed=10 + i, **kwargs)
    return {name: root / name for name in ADAPTERS}, peft_models


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def make_engine_model(base, max_loras=2, max_lora_rank=8, max_cpu_loras=4, use_ref=False):
    model = copy.deepcopy(base)
    context = LoRAContext(use_ref=use_ref)
    inject_adapters(model, "all-linear", max_loras, context)
    manager = AdapterManager(model, context, max_loras, max_lora_rank, max_cpu_loras, "cpu", torch.float64)
    return model, context, manager


def run(model, context, input_ids, row_slots):
    """Logits with sequence b using slot row_slots[b] (-1: base model)."""
    batch = LoRABatch.from_slots([s for s in row_slots for _ in range(input_ids.shape[1])])
    with torch.no_grad(), context.use(batch):
        return model(input_ids).logits


@pytest.mark.parametrize("use_ref", [False, True])
def test_each_adapter_matches_peft(base, adapter_dirs, input_ids, use_ref):
    paths, peft_models = adapter_dirs
    model, context, manager = make_engine_model(base, use_ref=use_ref)
    for name, path in paths.items():
        manager.register(name, path)
        slot = manager.activate({name})[name]
        with torch.no_grad():
            expected = peft_models[name](input_ids).logits
        torch.testing.assert_close(run(model, context, input_ids, [slot] * BATCH), expected,
                                   rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # no batch set: the plain base model
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_ref", [False, True])
def test_mixed_batch_matches_peft_mixed_batch(base, adapter_dirs, input_ids, use_ref):
    paths, _ = adapter_dirs
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths["all"], adapter_name="all").eval()
    peft_model.load_adapter(paths["rs"], adapter_name="rs")
    with torch.no_grad():
        expected = peft_model(input_ids, adapter_names=["rs", "__base__", "all"]).logits
    model, context, manager = make_engine_model(base, use_ref=use_ref)
    manager.register("all", paths["all"])
    manager.register("rs", paths["rs"])
    slot_of = manager.activate({"all", "rs"})
    got = run(model, context, input_ids, [slot_of["rs"], -1, slot_of["all"]])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_lru_eviction_reloads_transparently(base, adapter_dirs, input_ids):
    paths, peft_models = adapter_dirs
    model, context, manager = make_engine_model(base, max_loras=2, max_cpu_loras=1)
    for name in ("qv", "all", "rs"):
        manager.register(name, paths[name])
    assert manager.num_disk_loads == 3  # "qv" and "all" have left the CPU cache since

    copies = manager.num_slot_loads
    slot_qv = manager.activate({"qv"})["qv"]
    assert manager.num_disk_loads == 4 and manager.num_slot_loads == copies + 1
    assert manager.activate({"qv"}) == {"qv": slot_qv}  # resident: no reload, no copy
    assert manager.num_disk_loads == 4 and manager.num_slot_loads == copies + 1

    slot_all = manager.activate({"all"})["all"]
    assert slot_all != slot_qv
    slot_rs = manager.activate({"rs", "all"})["rs"]  # evicts "qv", the least recently used
    assert slot_rs == slot_qv and manager.active() == {"all": slot_all, "rs": slot_rs}
    slot_of = manager.activate({"qv", "rs"})  # evicts "all"; "qv" comes back from disk
    assert slot_of == {"qv": slot_all, "rs": slot_rs}
    with torch.no_grad():
        expected = torch.cat([peft_models["qv"](input_ids[:1]).logits, peft_models["rs"](input_ids[1:]).logits])
    got = run(model, context, input_ids, [slot_of["qv"], slot_of["rs"], slot_of["rs"]])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_registry_errors_leave_manager_usable(base, adapter_dirs, input_ids, tmp_path):
    paths, peft_models = adapter_dirs
    model, context, manager = make_engine_model(base, max_loras=2, max_lora_rank=4)
    manager.register("qv", paths["qv"])
    manager.register("qv", paths["qv"])  # same path: fine
    with pytest.raises(ValueError, match="'qv' is already registered"):
        manager.register("qv", paths["rs"])
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj has rank 6, above max_lora_rank=4"):
        manager.register("all", paths["all"])
    stray = LoRAAdapter(LoRAAdapterConfig(r=2, target_modules=["q_proj"]),
                        {"model.layers.7.self_attn.q_proj": (torch.randn(2, 64), torch.randn(64, 2))})
    save_adapter(stray, tmp_path / "stray")
    with pytest.raises(ValueError, match="target module model.layers.7.self_attn.q_proj not found in the model"):
        manager.register("stray", tmp_path / "stray")
    with pytest.raises(AdapterLoadError, match="adapter directory not found"):
        manager.register("missing", tmp_path / "nope")
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'; known adapters: qv") as info:
        manager.activate({"qv", "nope"})
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownAdapterError):
        manager.unregister("nope")
    manager.register("rs", paths["rs"])
    manager.register_weights("mem", load_adapter(paths["qv"]))
    with pytest.raises(ValueError, match="3 adapters requested at once but max_loras is 2"):
        manager.activate({"qv", "rs", "mem"})
    assert manager.names() == ["qv", "rs", "mem"] and manager.has("mem") and not manager.has("all")

    slot_of = manager.activate({"qv", "rs"})
    with torch.no_grad():
        expected = torch.cat([peft_models["qv"](input_ids[:2]).logits, peft_models["rs"](input_ids[2:]).logits])
    got = run(model, context, input_ids, [slot_of["qv"], slot_of["qv"], slot_of["rs"]])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_failed_reload_keeps_resident_adapters(base, adapter_dirs, tmp_path):
    paths, _ = adapter_dirs
    shutil.copytree(paths["rs"], tmp_path / "rs")
    _, _, manager = make_engine_model(base, max_loras=1, max_cpu_loras=1)
    manager.register("rs", tmp_path / "rs")
    manager.register("qv", paths["qv"])  # pushes "rs" out of the CPU cache
    slot = manager.activate({"qv"})["qv"]
    shutil.rmtree(tmp_path / "rs")
    with pytest.raises(AdapterLoadError):
        manager.activate({"rs"})
    assert manager.active() == {"qv": slot}
    assert manager.activate({"qv"}) == {"qv": slot}


def test_unregister_frees_slot_and_pinned_adapters_stay(base, adapter_dirs, tmp_path):
    paths, _ = adapter_dirs
    model, _, manager = make_engine_model(base, max_loras=1, max_cpu_loras=1)
    adapter = load_adapter(paths["qv"])
    manager.register_weights("mem", adapter)
    manager.register("rs", paths["rs"])
    manager.register("all", paths["all"])
    assert manager.get("mem") is adapter  # pinned: never evicted by the CPU LRU
    slot = manager.activate({"mem"})["mem"]
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.lora_a[slot] is not None
    manager.unregister("mem")
    assert q_proj.lora_a[slot] is None and manager.active() == {} and not manager.has("mem")
    assert manager.activate({"rs"}) == {"rs": slot}

    manager.save("rs", tmp_path / "saved")
    saved = load_adapter(tmp_path / "saved")
    for module, (a, b) in load_adapter(paths["rs"]).weights.items():
        assert torch.equal(saved.weights[module][0], a) and torch.equal(saved.weights[module][1], b)


def test_manager_rejects_uninjected_model(base):
    with pytest.raises(ValueError, match="run inject_adapters first"):
        AdapterManager(copy.deepcopy(base), LoRAContext(), 2, 8, 2, "cpu", torch.float64)


# ---- inject_adapters -------------------------------------------------------------------------

def test_inject_all_linear_skips_lm_head(base):
    model = copy.deepcopy(base)
    report = inject_adapters(model, "all-linear", 3, LoRAContext())
    assert len(report.wrapped) == 2 * 7 and "lm_head" not in report.wrapped
    assert report.wrapped[0] == "model.layers.0.self_attn.q_proj"
    assert not isinstance(model.lm_head, MultiLoRALinear)
    assert all(isinstance(model.get_submodule(n), MultiLoRALinear) for n in report.wrapped)
    with pytest.raises(ValueError, match="already a MultiLoRALinear"):
        inject_adapters(model, ["q_proj"], 3, LoRAContext())


def test_inject_by_suffix_and_regex(base):
    model = copy.deepcopy(base)
    report = inject_adapters(model, ["q_proj", "layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"],
                             2, LoRAContext())
    assert report.wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                              "model.layers.1.mlp.down_proj"]
    report = inject_adapters(model, r"model\.layers\.\d\.self_attn\.(k|v)_proj", 2, LoRAContext())
    assert len(report.wrapped) == 4


@pytest.mark.parametrize("targets, message", [
    (["nope_proj"], "target module 'nope_proj' not found"),
    (["lm_head"], "output head"),
    (["mlp"], "is a LlamaMLP, not an nn.Linear"),
    (r".*nothing", "matches no module"),
])
def test_inject_errors(base, targets, message):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        inject_adapters(model, targets, 2, LoRAContext())
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())  # nothing half-done
