"""The memory planner with fake devices: Mixtral-8x7B Q4_K_M on a 24 GB GPU, on a 4 GB laptop
GPU and on the CPU alone; the context it chooses; the KV figures checked against llama.cpp's."""

from __future__ import annotations

import pytest

from shimmy_core.contract.memory import DENSE, EXPERT, INPUT, OUTPUT, Device, MemoryFacts, PlacementRequest, WeightTensor
from shimmy_core.devices import parse_max_memory, parse_size
from shimmy_core.memory_planner import describe, margin_for, parse_moe_offload, plan

GB = 1000 ** 3
GiB = 1024 ** 3
MiB = 1024 ** 2

# bytes per element of the llama.cpp types in a Q4_K_M file
Q4_K, Q6_K, F32 = 144 / 256, 210 / 256, 4.0


def mixtral_8x7b_q4_k_m() -> MemoryFacts:
    """Mixtral-8x7B as llama.cpp's Q4_K_M writes it, from the model's tensor shapes: 32 layers,
    8 experts of 4096 -> 14336, 32000 tokens, GQA with 8 KV heads of 128.  Q4_K_M keeps Q6_K for
    attn_v, the output and ffn_down of half the layers (the first and last eighth and every third
    between); everything else Q4_K, norms and the router F32."""
    n, hidden, ffn, experts, vocab, kv = 32, 4096, 14336, 8, 32000, 8 * 128
    tensors = [WeightTensor("token_embd.weight", int(vocab * hidden * Q4_K), INPUT),
               WeightTensor("output.weight", int(vocab * hidden * Q6_K), OUTPUT),
               WeightTensor("output_norm.weight", int(hidden * F32), OUTPUT)]
    for i in range(n):
        more_bits = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
        tensors += [
            WeightTensor(f"blk.{i}.attn_q.weight", int(hidden * hidden * Q4_K), DENSE, i),
            WeightTensor(f"blk.{i}.attn_k.weight", int(hidden * kv * Q4_K), DENSE, i),
            WeightTensor(f"blk.{i}.attn_v.weight", int(hidden * kv * Q6_K), DENSE, i),
            WeightTensor(f"blk.{i}.attn_output.weight", int(hidden * hidden * Q4_K), DENSE, i),
            WeightTensor(f"blk.{i}.ffn_gate_inp.weight", int(hidden * experts * F32), DENSE, i),
            WeightTensor(f"blk.{i}.attn_norm.weight", int(hidden * F32), DENSE, i),
            WeightTensor(f"blk.{i}.ffn_norm.weight", int(hidden * F32), DENSE, i),
            WeightTensor(f"blk.{i}.ffn_gate_exps.weight", int(experts * ffn * hidden * Q4_K), EXPERT, i),
            WeightTensor(f"blk.{i}.ffn_up_exps.weight", int(experts * ffn * hidden * Q4_K), EXPERT, i),
            WeightTensor(f"blk.{i}.ffn_down_exps.weight", int(experts * ffn * hidden * (Q6_K if more_bits else Q4_K)),
                         EXPERT, i),
        ]
    n_ubatch, n_head = 512, 32
    return MemoryFacts(tensors=tuple(tensors), n_layers=n, kv_bytes_per_token=n * kv * 2 * 2, context_train=32768,
                       n_experts=experts, compute_base=int(n_ubatch * (vocab + 4 * hidden + 2 * ffn) * 4 * 0.75),
                       compute_per_cell=n_ubatch * 4)


def cpu(free_gb: float, total_gb: float = 64) -> Device:
    return Device("cpu", int(total_gb * GB), int(free_gb * GB), "host memory")


def gpu(free_gb: float, total_gb: float, name: str = "cuda:0") -> Device:
    return Device(name, int(total_gb * GB), int(free_gb * GB), "test GPU")


def test_the_mixtral_figures_match_the_real_file_and_llama_cpp():
    facts = mixtral_8x7b_q4_k_m()
    assert 26.0 * GB < facts.weight_bytes < 29.5 * GB   # the published Q4_K_M file: 28.4 GB (26.4 GiB)
    # llama.cpp: "KV buffer size = 1024.00 MiB" for Mixtral at -c 8192 with an f16 cache
    assert facts.kv_bytes_per_token * 8192 == 1024 * MiB
    dense, experts, inputs, outputs = facts.by_layer()
    assert sum(experts) > 0.95 * (facts.weight_bytes - inputs - outputs)  # experts are nearly all of it


def test_a_24_gb_gpu_keeps_every_layer_and_as_few_experts_as_needed_on_the_cpu():
    facts = mixtral_8x7b_q4_k_m()
    devices = [cpu(60), gpu(23.5, 24)]
    p = plan("mixtral", facts, devices, PlacementRequest(slots=1, max_ctx=8192))
    assert p.fits and p.gpu_layers == 32 and p.ctx_per_slot == 8192
    gpu_use = p.use("cuda:0")
    assert gpu_use.total <= devices[1].free - margin_for(devices[1])
    # llama-server users report --n-cpu-moe around 6-10 for this model on a 24 GB card
    assert 4 <= p.cpu_expert_layers <= 12
    # one layer's experts fewer on the CPU would not fit
    tighter = plan("mixtral", facts, devices, PlacementRequest(slots=1, max_ctx=8192,
                                                                moe_offload=str(p.cpu_expert_layers - 1)))
    assert tighter.gpu_layers < 32 or not tighter.fits or tighter.use("cuda:0").total > gpu_use.total
    assert any("experts of" in g for g in p.given_up)
    assert p.use("cpu").expert_layers == p.cpu_expert_layers
    assert gpu_use.layers == 32 and gpu_use.expert_layers == 32 - p.cpu_expert_layers


def test_without_expert_offload_a_24_gb_gpu_takes_fewer_layers():
    facts = mixtral_8x7b_q4_k_m()
    p = plan("mixtral", facts, [cpu(60), gpu(23.5, 24)], PlacementRequest(slots=1, max_ctx=8192, moe_offload="none"))
    assert p.fits and p.cpu_expert_layers == 0 and 20 <= p.gpu_layers < 32
    assert any("layers stay on the CPU" in g for g in p.given_up)


def test_a_4_gb_laptop_gpu_gets_attention_and_dense_layers_and_the_cpu_every_expert():
    facts = mixtral_8x7b_q4_k_m()
    p = plan("mixtral", facts, [cpu(40), gpu(3.8, 4)], PlacementRequest(slots=1, max_ctx=8192))
    # the dense layers, the KV cache and the output take ~2.1 GB; one layer's experts (~0.85 GB) still fit
    assert p.fits and p.gpu_layers == 32 and p.cpu_expert_layers in (30, 31)
    assert p.use("cuda:0").total < 3.8 * GB
    every = plan("mixtral", facts, [cpu(40), gpu(3.8, 4)], PlacementRequest(slots=1, max_ctx=8192, moe_offload="all"))
    assert every.gpu_layers == 32 and every.use("cuda:0").weights < 1.0 * GB
    assert p.use("cpu").weights > 25 * GB


def test_on_the_cpu_alone_offload_has_nothing_to_save_and_says_so():
    facts = mixtral_8x7b_q4_k_m()
    p = plan("mixtral", facts, [cpu(60)], PlacementRequest(slots=4, max_ctx=8192))
    assert p.fits and p.gpu_layers == 0 and p.cpu_expert_layers == 0 and [u.device for u in p.uses] == ["cpu"]
    assert any("no GPU" in n and "nothing to save" in n for n in p.notes)
    assert p.slots == 4 and p.ctx_per_slot == 2048  # 8192 shared by 4 slots, as llama-server -np 4
    explicit = plan("mixtral", facts, [cpu(60)], PlacementRequest(moe_offload="all"))
    assert explicit.cpu_expert_layers == 32 and any("applied all the same" in n for n in explicit.notes)
    assert "does not fit" not in "\n".join(describe(p))


def test_too_little_memory_gives_up_context_then_slots_then_refuses():
    facts = mixtral_8x7b_q4_k_m()
    weights = facts.weight_bytes
    # room for the weights and a little KV: the context shrinks
    p = plan("mixtral", facts, [cpu((weights + 0.5 * GiB + 512 * MiB + 200 * MiB) / GB)],
             PlacementRequest(slots=4, max_ctx=32768, ctx_per_slot=0))
    assert p.fits and p.ctx_per_slot < 8192 and any("context per slot" in g for g in p.given_up)
    # not even the weights: refused, with the shrinking tried
    p = plan("mixtral", facts, [cpu(16)], PlacementRequest(slots=4))
    assert not p.fits and p.use("cpu").weights == pytest.approx(weights)
    assert "does not fit" in describe(p)[-1]


def test_gpu_layers_by_hand_and_two_gpus():
    facts = mixtral_8x7b_q4_k_m()
    p = plan("mixtral", facts, [cpu(60), gpu(23.5, 24)], PlacementRequest(slots=1, gpu_layers=8, moe_offload="none"))
    assert p.gpu_layers == 8 and p.cpu_expert_layers == 0 and p.use("cpu").layers == 24
    two = plan("mixtral", facts, [cpu(60), gpu(23.5, 24), gpu(23.5, 24, "cuda:1")], PlacementRequest(slots=1))
    assert two.fits and two.gpu_layers == 32 and two.cpu_expert_layers == 0
    assert two.use("cuda:0").total == pytest.approx(two.use("cuda:1").total, rel=0.01)


def test_a_dense_model_on_the_cpu_and_an_explicit_context():
    facts = MemoryFacts(tensors=(WeightTensor("blk.0.attn_q.weight", 100 * MiB, DENSE, 0),), n_layers=1,
                        kv_bytes_per_token=1000, context_train=4096)
    p = plan("dense", facts, [cpu(8)], PlacementRequest(slots=2, max_ctx=8192))
    assert (p.slots, p.ctx_per_slot, p.n_experts) == (2, 2048, 0)
    p = plan("dense", facts, [cpu(8)], PlacementRequest(slots=2, ctx_per_slot=3000))
    assert p.ctx_per_slot == 3000 and p.use("cpu").kv == 2 * 3000 * 1000
    p = plan("dense", facts, [cpu(8)], PlacementRequest(slots=16, max_ctx=8192))
    assert p.ctx_per_slot == 1024  # never under 1024 tokens a slot by default


def test_option_parsing():
    assert parse_moe_offload("auto", 8) is None and parse_moe_offload("all", 8) == 8
    assert parse_moe_offload("3", 8) == 3 and parse_moe_offload("99", 8) == 8 and parse_moe_offload("none", 8) == 0
    with pytest.raises(ValueError):
        parse_moe_offload("some", 8)
    assert parse_size("512M") == 512 * MiB and parse_size("1.5G") == int(1.5 * GiB) and parse_size("100") == 100
    assert parse_max_memory("8G") == {"cpu": 8 * GiB}
    assert parse_max_memory("cpu=8G,cuda:0=20GiB") == {"cpu": 8 * GiB, "cuda:0": 20 * GiB}
