"""Memory and placement with real models: the demo model's figures against llama.cpp's, the
tiny random Mixtral in both formats served with and without expert offload, the refusal of a
model that cannot fit, eviction to make room, per-model options, ``probe`` and ``gpu-info``."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from shimmy_core.cli import main
from shimmy_core.catalog import ModelManager
from shimmy_core.contract.generation import InsufficientMemory, Overloaded
from shimmy_core.contract.memory import DENSE, Device, MemoryFacts, WeightTensor
from shimmy_core.contract.model_info import ModelInfo
from shimmy_core.contract.settings import Settings
from tests.conftest import serve_model
from tests.test_ops import Counting, manager

MiB = 1024 ** 2
GREEDY = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 12, "temperature": 0}


def gguf_facts(path, **settings):
    from shimmy_plugins.backends.gguf.gguf_placement import memory_facts

    return memory_facts(str(path), Settings(demo=False).replace(**settings), gpu_capable=False)


def chat(server, model: str) -> str:
    r = httpx.post(server.url + "/chat/completions", json={"model": model, **GREEDY},
                   headers={"Cache-Control": "no-cache"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def placement(server, model: str) -> dict:
    [entry] = [m for m in httpx.get(server.base + "/health", timeout=10).json()["models"] if m["id"] == model]
    return entry["placement"]


# ------------------------------------------------------------------ the demo model
def test_the_demo_models_figures_match_llama_cpps(smollm2_path):
    """llama.cpp reports for SmolLM2 with 4 slots of 2048 (8192 cells): "KV buffer size = 180.00
    MiB" and "compute buffer size = 99.38 MiB"; with 4 x 8192: 720 MiB and 166.38 MiB."""
    facts = gguf_facts(smollm2_path)
    assert facts.n_layers == 30 and facts.n_experts == 0 and facts.context_train == 8192
    assert facts.kv_bytes_per_token * 8192 == 180 * MiB
    for cells, measured in ((2048, 99.38), (8192, 166.38)):
        estimate = (facts.compute_base + facts.compute_per_cell * cells) / MiB
        assert abs(estimate - measured) / measured < 0.10, (cells, estimate)
    assert gguf_facts(smollm2_path, cache_type_k="q8_0", cache_type_v="q8_0").kv_bytes_per_token == 23040 * 34 // 64


def test_a_quantized_v_cache_needs_flash_attention(smollm2_path):
    from shimmy_core.contract.generation import InvalidRequest

    with pytest.raises(InvalidRequest, match="needs flash attention"):
        gguf_facts(smollm2_path, cache_type_v="q8_0", flash_attn="off")
    with pytest.raises(InvalidRequest, match="KV cache type"):
        gguf_facts(smollm2_path, cache_type_k="q5_1")
    from shimmy_plugins.backends.gguf.gguf_placement import flash_attention

    settings = Settings(demo=False)
    assert flash_attention(settings, on_gpu=False) == "off" and flash_attention(settings, on_gpu=True) == "auto"
    assert flash_attention(settings.replace(cache_type_v="q4_0"), on_gpu=False) == "on"


def test_the_default_server_shares_the_models_context_among_its_slots(gguf_server):
    chat(gguf_server, "SmolLM2-135M-Instruct.Q4_1")
    plan = placement(gguf_server, "SmolLM2-135M-Instruct.Q4_1")
    assert (plan["slots"], plan["ctx_per_slot"], plan["gpu_layers"]) == (4, 2048, 0)
    assert set(plan["devices"]) == {"cpu"} and plan["devices"]["cpu"]["kv_cache"] == 180 * MiB


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(start_server, smollm2_path):
    srv = serve_model(start_server, smollm2_path, "--max-memory", "300M")
    r = httpx.post(srv.url + "/chat/completions", json={"model": "SmolLM2-135M-Instruct.Q4_1", **GREEDY}, timeout=60)
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_memory" and "does not fit" in error["message"]
    assert "cpu: needs" in error["message"] and "free" in error["message"]
    assert httpx.get(srv.base + "/health", timeout=10).json()["models"] == []


def test_the_neutral_error_is_507_in_every_envelope():
    from shimmy_core.http.errors import plain_error
    from shimmy_plugins.dialects.openai.openai_errors import error_response

    status, _, body = error_response(InsufficientMemory("too big"))
    assert status == 507 and body["error"]["code"] == "insufficient_memory"
    assert plain_error(InsufficientMemory("too big"))[0] == 507


# ------------------------------------------------------------------ the MoE model
def test_the_moe_gguf_header_gives_experts_by_layer(moe_models):
    _, gguf = moe_models
    facts = gguf_facts(gguf)
    assert (facts.n_layers, facts.n_experts) == (2, 4)
    dense, experts, inputs, outputs = facts.by_layer()
    assert all(e > 0 for e in experts) and all(d > 0 for d in dense) and inputs > 0 and outputs > 0
    expert_names = sorted(t.name for t in facts.tensors if t.part == "expert" and t.layer == 0)
    assert expert_names == ["blk.0.ffn_down_exps.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"]


def test_moe_gguf_greedy_text_is_the_same_with_expert_offload(start_server, moe_models, capsys):
    _, gguf = moe_models
    plain = serve_model(start_server, gguf)
    offloaded = serve_model(start_server, gguf, "--moe-offload", "all")
    first = serve_model(start_server, gguf, "--n-cpu-moe", "1")
    texts = [chat(s, "tiny-mixtral") for s in (plain, offloaded, first)]
    assert texts[0] and texts[0] == texts[1] == texts[2]
    assert [placement(s, "tiny-mixtral")["cpu_expert_layers"] for s in (plain, offloaded, first)] == [0, 2, 1]
    assert main(["probe", "--model", str(gguf), "--no-demo", "tiny-mixtral", "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out and "nothing to save" in out and "2 of 2 layers" in out


def test_moe_safetensors_serves_with_and_without_offload(start_server, moe_models):
    folder, _ = moe_models
    plain = serve_model(start_server, folder)
    offloaded = serve_model(start_server, folder, "--moe-offload", "all")
    assert chat(plain, "tiny-mixtral") == chat(offloaded, "tiny-mixtral")
    plan = placement(plain, "tiny-mixtral")
    assert plan["experts"] == 4 and plan["layers"] == 2 and plan["gpu_layers"] == 0
    assert set(plan["devices"]) == {"cpu"}


def test_safetensors_device_map_keeps_experts_of_the_first_layers_on_the_cpu():
    from shimmy_core.contract.memory import DeviceUse, Plan
    from shimmy_plugins.backends.safetensors.safetensors_placement import device_map, max_memory

    plan = Plan("m", True, (DeviceUse("cpu", 100), DeviceUse("cuda:0", 200)), gpu_layers=4, cpu_expert_layers=2,
                slots=1, ctx_per_slot=512, n_layers=4, n_experts=8)
    mapping = device_map(plan, "cuda:0")
    assert mapping["model.layers.0"] == "cuda:0" and mapping["model.layers.0.mlp.experts"] == "cpu"
    assert "model.layers.2.mlp.experts" not in mapping and mapping["lm_head"] == "cuda:0"
    assert list(mapping).index("model.layers.0.mlp.experts") > list(mapping).index("model.layers.0")
    assert max_memory(plan) == {"cpu": 100, 0: 200}
    some = Plan("m", True, (), gpu_layers=3, cpu_expert_layers=0, slots=1, ctx_per_slot=512, n_layers=4)
    assert device_map(some, "cuda:0")["model.layers.0"] == "cpu" and device_map(some, "cuda:0")["lm_head"] == "cpu"
    assert device_map(Plan("m", True, (), 4, 0, 1, 512, 4), "cuda:0") is None  # all on the GPU: one device


# ------------------------------------------------------------------ eviction
class Sized(Counting):
    """A backend whose models need ``extra["mib"]`` MiB of CPU memory each."""

    name = "sized"
    formats = ("sized",)

    def memory_facts(self, model, settings):
        size = model.extra["mib"] * MiB
        return MemoryFacts(tensors=(WeightTensor("w", size, DENSE, 0),), n_layers=1, kv_bytes_per_token=0,
                           context_train=1024)

    def load(self, model, settings, plan=None):
        assert plan is not None and plan.fits
        return super().load(model, settings)


def sized_manager(free_mib: int) -> tuple[ModelManager, Sized]:
    """Free memory as a machine would report it: ``free_mib`` less what the loaded models hold."""
    def devices():
        return [Device("cpu", 4096 * MiB, free_mib * MiB - sum(e.bytes_on("cpu") for e in mgr._entries.values()))]

    mgr, backend = manager(Sized(), devices, memory_margin="0")
    return mgr, backend


def sized(name: str, mib: int) -> ModelInfo:
    return ModelInfo(id=name, path=f"/models/{name}", format="sized", source="test", extra={"mib": mib})


def test_idle_models_are_unloaded_least_recently_used_first_to_make_room():
    mgr, backend = sized_manager(1000)
    a = mgr.get(sized("a", 400))
    b = mgr.get(sized("b", 400))
    del a, b  # both idle; a used first
    c = mgr.get(sized("c", 400))
    assert ("close", "a") in backend.log and ("close", "b") not in backend.log
    assert sorted(m["id"] for m in mgr.stats()) == ["b", "c"]
    # c is busy (its lease lives): a model that needs c's memory waits for it
    with pytest.raises(Overloaded, match="busy"):
        mgr.get(sized("d", 900))
    assert ("close", "c") not in backend.log
    del c
    mgr.get(sized("d", 900))
    assert ("close", "c") in backend.log and ("close", "b") in backend.log
    with pytest.raises(InsufficientMemory, match="does not fit") as info:
        mgr.get(sized("huge", 5000))
    assert "cpu: needs" in str(info.value) and info.value.plan is not None
    assert ("load", "huge") not in backend.log
    mgr.close()


class Gated(Sized):
    """A load that waits for ``gate``: its memory shows in the devices only once it is loaded,
    as a real allocation shows only while (and after) it happens."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.loading = threading.Event()

    def load(self, model, settings, plan=None):
        self.loading.set()
        assert self.gate.wait(10)
        return super().load(model, settings, plan)


def test_two_loads_never_plan_against_the_same_free_memory():
    """a (600 MiB) is loading when b (600 MiB) arrives; with 1000 MiB free both fit alone, not
    together.  b is planned only once a is in place: a is busy, so b gets a 503 to retry."""
    backend = Gated()

    def devices():
        return [Device("cpu", 4096 * MiB, 1000 * MiB - sum(e.bytes_on("cpu") for e in mgr._entries.values()))]

    mgr, _ = manager(backend, devices, memory_margin="0")
    got: dict = {}

    def load(name):
        try:
            got[name] = mgr.get(sized(name, 600))
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            got[name] = exc

    first = threading.Thread(target=load, args=("a",))
    first.start()
    assert backend.loading.wait(10)
    second = threading.Thread(target=load, args=("b",))
    second.start()
    time.sleep(0.2)  # b is waiting for its turn, not loading
    assert ("load", "b") not in backend.log
    backend.gate.set()
    first.join(10)
    second.join(10)
    assert not isinstance(got["a"], Exception)
    assert isinstance(got["b"], Overloaded) and ("load", "b") not in backend.log
    mgr.close()


# ------------------------------------------------------------------ options and reports
def test_shimmy_add_keeps_a_models_own_placement(tmp_path, monkeypatch, capsys, moe_models):
    _, gguf = moe_models
    monkeypatch.setenv("SHIMMY_HOME", str(tmp_path))
    copy = tmp_path / "tiny.gguf"
    shutil.copyfile(gguf, copy)
    assert main(["add", str(copy), "--ctx-size", "512", "--n-cpu-moe", "1", "--parallel", "2"]) == 0
    assert "ctx_size=512" in capsys.readouterr().out
    doc = json.loads((tmp_path / "registered-models.json").read_text())
    assert doc["models"][0]["options"] == {"ctx_size": 512, "parallel": 2, "moe_offload": "1"}
    assert main(["probe", "tiny", "--no-demo", "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "2 slot(s) x 512 tokens" in out and "experts of the first 1 layers" in out
    assert main(["add", str(gguf), "--name", "bad", "--flash-attn", "off", "--cache-type-v", "q8_0"]) == 0
    assert main(["probe", "bad", "--no-demo", "--plan-only"]) == 1
    assert "needs flash attention" in capsys.readouterr().err


def test_gpu_info_lists_the_cpu_and_says_when_there_is_no_gpu(capsys):
    assert main(["gpu-info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DEVICE") and "\ncpu " in out
    if shutil.which("nvidia-smi") is None:
        assert "No GPU found" in out
    assert main(["gpu-info", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)
    assert devices[0]["device"] == "cpu" and devices[0]["free"] > 0
