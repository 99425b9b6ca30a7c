"""The memory planner: where a model's layers and experts go, and how many slots of how much
context it gets, so that it fits the memory that is free with a margin.

It plans from what the model's backend reads off the headers (:class:`MemoryFacts`: weights
by tensor, the KV cache per token, compute buffers) and the devices there are; it knows no
model format.  The order of choices:

1. **Context.** ``--ctx-size`` per slot when given; otherwise the model's trained context, at
   most ``--max-ctx``, shared by the slots (llama-server's default: ``-c`` for all of ``-np``),
   each slot at least :data:`MIN_SLOT_CTX` tokens.
2. **GPU layers** (where there is a GPU and the backend can use it): every layer on the GPU;
   when that does not fit, the routed experts of the first layers stay in CPU memory, one layer
   more at a time (``--moe-offload auto``: dense layers and attention first), and only when all
   experts are on the CPU do whole layers leave the GPU, from the first.  ``--gpu-layers N`` and
   ``--moe-offload all|none|N`` fix either choice.
3. **Giving up**: when the CPU's share does not fit either, each slot's context is halved down
   to :data:`MIN_SLOT_CTX`, then slots are dropped down to one.  A model that does not fit
   then is refused before anything is allocated (:class:`InsufficientMemory`, with the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from shimmy_core.contract.memory import Device, DeviceUse, MemoryFacts, Plan, PlacementRequest
from shimmy_core.formatting import human_size

MIN_SLOT_CTX = 512
MIN_DEFAULT_SLOT_CTX = 1024   # the default per-slot context when the model's is shared by many slots
CPU_MARGIN = 512 * 1024 * 1024
GPU_MARGIN = 256 * 1024 * 1024  # besides 5% of the card: the CUDA context and fragmentation


def margin_for(device: Device, asked: int = -1) -> int:
    if asked >= 0:
        return asked
    if device.is_gpu:
        return max(GPU_MARGIN, device.total // 20)
    return CPU_MARGIN


def parse_moe_offload(value: str | int | None, n_layers: int) -> int | None:
    """``--moe-offload`` as the number of layers whose experts stay on the CPU; None: auto."""
    text = str(value if value is not None else "auto").strip().lower()
    if text in ("", "auto"):
        return None
    if text in ("all", "cpu"):
        return n_layers
    if text in ("none", "off", "0"):
        return 0
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--moe-offload {value!r}: use auto, all, none or a number of layers") from None
    if n < 0:
        raise ValueError(f"--moe-offload {value!r}: the number of layers cannot be negative")
    return min(n, n_layers)


def default_slot_context(facts: MemoryFacts, req: PlacementRequest) -> int:
    if req.ctx_per_slot > 0:
        return req.ctx_per_slot
    budget = min(facts.context_train or 4096, req.max_ctx)
    per_slot = max(budget // max(1, req.slots), min(budget, MIN_DEFAULT_SLOT_CTX))
    return per_slot // 256 * 256 if per_slot >= 256 else per_slot


@dataclass
class _Layout:
    gpu_layers: int
    cpu_experts: int
    ctx: int
    slots: int
    gpu: int = 0
    cpu: int = 0
    uses: tuple[DeviceUse, ...] = ()


class Planner:
    """Plans one model against devices with this much free (``devices``: the CPU first)."""

    def __init__(self, devices: list[Device] | tuple[Device, ...], req: PlacementRequest):
        self.cpu = next((d for d in devices if not d.is_gpu), Device("cpu", 0, 0))
        self.gpus = [d for d in devices if d.is_gpu]
        self.req = req

    def layout(self, facts: MemoryFacts, gpu_layers: int, cpu_experts: int, ctx: int, slots: int) -> _Layout:
        dense, experts, inputs, outputs = facts.by_layer()
        n = facts.n_layers
        first_gpu = n - gpu_layers           # llama.cpp offloads the last gpu_layers layers
        kv_layer = facts.kv_bytes_per_token / max(1, n) * ctx * slots
        compute = facts.compute_base + facts.compute_per_cell * ctx
        gpu_w = sum(dense[first_gpu:]) + sum(e for i, e in enumerate(experts) if i >= max(first_gpu, cpu_experts))
        cpu_w = inputs + sum(dense[:first_gpu]) + sum(e for i, e in enumerate(experts)
                                                      if i < first_gpu or i < cpu_experts)
        if gpu_layers >= n and n:
            gpu_w += outputs
        else:
            cpu_w += outputs
        gpu_kv, cpu_kv = int(kv_layer * gpu_layers), int(kv_layer * (n - gpu_layers))
        gpu_compute = compute if gpu_layers else 0
        cpu_compute = compute if gpu_layers < n or not gpu_layers else facts.compute_base // 4
        uses = [DeviceUse("cpu", cpu_w, cpu_kv, cpu_compute, n - gpu_layers,
                          sum(1 for i in range(n) if i < first_gpu or i < cpu_experts) if facts.n_experts else 0,
                          self.cpu.free)]
        if self.gpus and gpu_layers:
            share = [d.free for d in self.gpus]
            whole = sum(share) or 1
            for d, f in zip(self.gpus, share):
                part = f / whole
                uses.append(DeviceUse(d.name, int(gpu_w * part), int(gpu_kv * part), int(gpu_compute * part),
                                      round(gpu_layers * part),
                                      round(max(0, gpu_layers - max(0, cpu_experts - first_gpu)) * part)
                                      if facts.n_experts else 0, d.free))
        return _Layout(gpu_layers, cpu_experts, ctx, slots, gpu_w + gpu_kv + gpu_compute,
                       cpu_w + cpu_kv + cpu_compute, tuple(uses))

    def _room(self) -> tuple[int, int]:
        cpu = self.cpu.free - margin_for(self.cpu, self.req.margin)
        gpu = sum(d.free - margin_for(d, self.req.margin) for d in self.gpus)
        return cpu, gpu

    def place(self, facts: MemoryFacts, ctx: int, slots: int) -> _Layout:
        """The first placement in the planner's order whose GPU share fits (the CPU's share only
        grows along that order, so :meth:`fits` decides for the CPU)."""
        n = facts.n_layers
        _, gpu_room = self._room()
        fixed_experts = parse_moe_offload(self.req.moe_offload, n) if facts.n_experts else 0
        if not (self.gpus and facts.gpu_capable and self.req.gpu_layers != 0):
            return self.layout(facts, 0, fixed_experts or 0, ctx, slots)
        if self.req.gpu_layers > 0:
            g = min(self.req.gpu_layers, n)
            order = [(g, e) for e in ([fixed_experts] if fixed_experts is not None else range(n + 1))]
        elif fixed_experts is not None:
            order = [(g, fixed_experts) for g in range(n, -1, -1)]
        else:  # every layer on the GPU, its experts leaving first; then whole layers
            order = [(n, e) for e in range(n + 1)] + [(g, n) for g in range(n - 1, -1, -1)]
        for g, e in order:
            lay = self.layout(facts, g, e, ctx, slots)
            if lay.gpu <= gpu_room:
                return lay
        return lay

    def fits(self, lay: _Layout) -> bool:
        cpu_room, gpu_room = self._room()
        return lay.cpu <= cpu_room and lay.gpu <= max(0, gpu_room)


def plan(model: str, facts: MemoryFacts, devices: list[Device] | tuple[Device, ...],
         req: PlacementRequest) -> Plan:
    planner = Planner(devices, req)
    n = facts.n_layers
    ctx = default_slot_context(facts, req)
    slots = max(1, req.slots)
    given_up: list[str] = []
    notes: list[str] = list(facts.notes)
    trials = [(ctx, slots)]
    c = ctx
    while c // 2 >= MIN_SLOT_CTX:
        c //= 2
        trials.append((c, slots))
    s = slots
    while s > 1:
        s -= 1
        trials.append((c, s))
    chosen = None
    for c, s in trials:
        lay = planner.place(facts, c, s)
        if planner.fits(lay):
            chosen = lay
            break
    fits = chosen is not None
    lay = chosen or planner.place(facts, ctx, slots)
    if lay.ctx < ctx:
        given_up.append(f"context per slot {ctx} -> {lay.ctx} tokens")
    if lay.slots < slots:
        given_up.append(f"slots {slots} -> {lay.slots}")
    if planner.gpus and facts.gpu_capable and req.gpu_layers != 0:
        if lay.gpu_layers < n and req.gpu_layers < 0:
            given_up.append(f"{n - lay.gpu_layers} of {n} layers stay on the CPU")
        if facts.n_experts and lay.cpu_experts and parse_moe_offload(req.moe_offload, n) is None:
            given_up.append(f"the experts of {min(lay.cpu_experts, n)} of {n} layers stay in CPU memory")
    elif facts.n_experts:
        if not planner.gpus:
            notes.append("no GPU: every weight is in CPU memory already, so expert offload has nothing to save"
                         + (f" (--moe-offload {req.moe_offload} is applied all the same)"
                            if parse_moe_offload(req.moe_offload, n) else ""))
    if not planner.gpus and req.gpu_layers > 0:
        notes.append(f"--gpu-layers {req.gpu_layers}: no GPU here, every layer runs on the CPU")
    return Plan(model=model, fits=fits, uses=lay.uses, gpu_layers=lay.gpu_layers,
                cpu_expert_layers=min(lay.cpu_experts, n) if facts.n_experts else 0,
                slots=lay.slots, ctx_per_slot=lay.ctx, n_layers=n, n_experts=facts.n_experts,
                given_up=tuple(given_up), notes=tuple(notes))


def shortfall(plan: Plan, devices: list[Device] | tuple[Device, ...], margin: int = -1) -> str:
    """Why ``plan`` does not fit, with the numbers of each device."""
    parts = []
    for use in plan.uses:
        device = next((d for d in devices if d.name == use.device), None)
        if device is None:
            continue
        keep = margin_for(device, margin)
        parts.append(f"{use.device}: needs {human_size(use.total)} (weights {human_size(use.weights)}, "
                     f"KV cache {human_size(use.kv)}, compute {human_size(use.compute)}) with "
                     f"{human_size(max(0, device.free))} free and {human_size(keep)} kept as a margin")
    return "; ".join(parts)


def describe(plan: Plan) -> list[str]:
    """The plan in lines, for ``shimmy probe`` and logs."""
    lines = [f"context: {plan.slots} slot(s) x {plan.ctx_per_slot} tokens"]
    for use in plan.uses:
        layers = f"{use.layers} of {plan.n_layers} layers"
        if plan.n_experts:
            layers += f", experts of {use.expert_layers} layers ({plan.n_experts} experts each)"
        lines.append(f"{use.device}: {human_size(use.total)} = weights {human_size(use.weights)} + KV cache "
                     f"{human_size(use.kv)} + compute {human_size(use.compute)}; {layers}; "
                     f"{human_size(use.free)} free")
    if plan.n_experts and plan.cpu_expert_layers:
        lines.append(f"expert offload: the experts of the first {plan.cpu_expert_layers} layers stay in CPU memory")
    lines += [f"given up to fit: {g}" for g in plan.given_up] or ["given up to fit: nothing"]
    lines += [f"note: {n}" for n in plan.notes]
    if not plan.fits:
        lines.append("does not fit")
    return lines
