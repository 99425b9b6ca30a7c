"""Memory and placement: what a model needs (:class:`MemoryFacts`, from its backend, read off
its headers), the devices there are (:class:`Device`), what the planner was asked
(:class:`PlacementRequest`) and what it decided (:class:`Plan`).

The core plans without knowing any model format: a backend that can say what its models need
implements ``memory_facts(model, settings) -> MemoryFacts`` and receives the plan in
``load(model, settings, plan=plan)``.  ``shimmy_core.memory_planner`` makes the plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# What part of the model a weight tensor is: placed by different rules.
INPUT = "input"     # the token embeddings: llama.cpp keeps them in CPU memory
OUTPUT = "output"   # the last norm and the output projection: on the GPU only with every layer
DENSE = "dense"     # a layer's attention, norms, router and shared experts
EXPERT = "expert"   # a layer's routed experts (Mixture of Experts): may stay in CPU memory


@dataclass(frozen=True)
class WeightTensor:
    name: str
    nbytes: int
    part: str = DENSE
    layer: int | None = None


@dataclass(frozen=True)
class MemoryFacts:
    """What a model needs in memory with the settings it will load with."""

    tensors: tuple[WeightTensor, ...]
    n_layers: int
    kv_bytes_per_token: int        # K and V of one token in every layer, in the cache types asked for
    context_train: int | None = None
    n_experts: int = 0
    compute_base: int = 0          # compute buffers that do not grow with the context
    compute_per_cell: int = 0      # compute buffer bytes per KV cell of one slot (attention scores)
    gpu_capable: bool = True       # the backend can place layers on a GPU here
    notes: tuple[str, ...] = ()

    def by_layer(self) -> tuple[list[int], list[int], int, int]:
        """(dense bytes per layer, expert bytes per layer, input bytes, output bytes)."""
        dense, experts = [0] * self.n_layers, [0] * self.n_layers
        inputs = outputs = 0
        for t in self.tensors:
            if t.part == INPUT:
                inputs += t.nbytes
            elif t.part == OUTPUT or t.layer is None or not 0 <= t.layer < self.n_layers:
                outputs += t.nbytes
            elif t.part == EXPERT:
                experts[t.layer] += t.nbytes
            else:
                dense[t.layer] += t.nbytes
        return dense, experts, inputs, outputs

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Device:
    """A place to put weights: the CPU's memory or one GPU."""

    name: str                      # "cpu", "cuda:0"
    total: int
    free: int
    label: str = ""                # "NVIDIA GeForce RTX 4090", "host memory"

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


@dataclass(frozen=True)
class PlacementRequest:
    """What the settings ask of a placement; 0, -1 and "auto" leave the choice to the planner."""

    slots: int = 4
    ctx_per_slot: int = 0          # 0: the model's context (at most max_ctx) shared by the slots
    max_ctx: int = 8192
    gpu_layers: int = -1           # -1: as many as fit
    moe_offload: str = "auto"      # auto, all, none, or N: the experts of the first N layers stay on the CPU
    margin: int = -1               # bytes kept free on each device; -1: the planner's default


@dataclass(frozen=True)
class DeviceUse:
    device: str
    weights: int = 0
    kv: int = 0
    compute: int = 0
    layers: int = 0                # layers whose dense weights are here
    expert_layers: int = 0         # layers whose experts are here
    free: int = 0                  # what the device had free when planned

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


@dataclass(frozen=True)
class Plan:
    """Where a model goes and how much context it gets; ``fits`` False: it cannot load."""

    model: str
    fits: bool
    uses: tuple[DeviceUse, ...]
    gpu_layers: int                # layers on the GPU(s), counted from the last (llama.cpp's n_gpu_layers)
    cpu_expert_layers: int         # the first N layers' experts are kept in CPU memory
    slots: int
    ctx_per_slot: int
    n_layers: int
    n_experts: int = 0
    given_up: tuple[str, ...] = ()  # what was reduced to fit, in words
    notes: tuple[str, ...] = ()

    def use(self, device: str) -> DeviceUse:
        return next((u for u in self.uses if u.device == device), DeviceUse(device))

    @property
    def total(self) -> int:
        return sum(u.total for u in self.uses)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["devices"] = [{**asdict(u), "total": u.total} for u in self.uses]
        del data["uses"]
        return data

