"""The cost model of heterogeneity-adaptive sequence parallelism (FlexSP, Wang et al. 2024).

A sequence of s tokens on an SP group of degree d (Ulysses: every device holds s/d tokens, attention runs
over whole sequences for 1/d of the heads) costs

    time   = (a1 * s^2 + a2 * s) / d  +  (s/d) * (d-1)/d * bytes_per_token / bandwidth(d)   per sequence, ms

(no all-to-all for d = 1), and a group's time in one micro-batch is its fixed cost plus the sum over its
sequences: b + calls * latency(d). The latency is paid once per group, not per sequence: a group packs its
sequences into one varlen batch, so each all-to-all call carries all of them. Each device of the group holds

    memory = model states + activation_bytes_per_token * tokens / d   <= memory cap

Model states are ZeRO-3's: weights, gradients and optimizer state divided over every device of the SP domain
(`model_state_bytes`). That is what the executor holds because trainers/loop.py reduce-scatters the gradients
after every micro-batch under adaptive SP; with the reduction deferred to a step's last micro-batch, each
device would hold the whole model's unsharded float32 gradients as well (25.1 GiB of FlexSP's 28 GiB cap for
its 6.74B parameters). The per-micro-batch cost b was measured that way too: FlexSP trains on ZeRO-3, which
reduce-scatters each micro-batch's gradients in its backward hooks.

`bytes_per_token` is what one device sends per token it holds over one forward and backward pass: four
all-to-alls per layer forward (q, k, v, out) and four backward, each moving the token's hidden vector.
Coefficients are either published (`flexsp-7b`, for simulation) or profiled on the actual devices and saved
as JSON (`parallel.adaptive.cost_model: PATH`). Units: milliseconds; memory in binary units (GB = 2^30 B);
bandwidth in decimal GB/s (1e9 B/s), as vendors and NCCL report it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GB = 2**30
MB = 2**20


@dataclass(frozen=True)
class CostModel:
    name: str
    attention_ms_per_token2: float
    """a1: the quadratic (attention) term of one sequence's forward+backward on one device."""
    linear_ms_per_token: float
    """a2: the linear term (projections, MLP, norms) per token on one device."""
    overhead_ms: float
    """b: a constant per group and micro-batch (launches, FSDP/ZeRO gathers, the optimizer's share)."""
    activation_bytes_per_token: float
    """Activation memory one device keeps per token it holds."""
    memory_cap_bytes: float
    """What a device may use: model states + activations must stay under it."""
    param_count: int
    """Parameters of the model (for the model states)."""
    state_bytes_per_param: float = 16.0
    """float32 weights, gradients and Adam's two moments: 16 B per parameter."""
    states_sharded: bool = True
    """ZeRO-3 / FSDP with gradients reduced to their shards after every micro-batch: model states are divided
    over all devices of the SP domain."""
    alltoall_bytes_per_token: float = 0.0
    """Bytes one device sends, per token it holds, over a forward and backward pass (all layers)."""
    alltoall_gbps: dict[int, float] = field(default_factory=dict)
    """All-to-all bandwidth (GB/s, 1e9 B/s) of a group of each degree (2, 4, ...)."""
    alltoall_latency_ms: dict[int, float] = field(default_factory=dict)
    """Fixed cost of one all-to-all call by degree (profiled; small next to the bandwidth term on GPUs)."""
    alltoall_calls: int = 0
    """All-to-all calls per forward+backward (8 per layer for Ulysses)."""
    devices_per_node: int = 8
    """Devices sharing fast links; a group never straddles a node boundary unless it spans whole nodes."""
    token_cap_per_device: float | None = None
    """An extra cap on the tokens one device holds per micro-batch (parallel.adaptive.max_tokens_per_device)."""
    measured_ms: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    """Profiled (a1, a2, b) of one sequence's forward+backward in a group of each degree, all-to-alls included:
    where present they replace the formula above for that degree (a1 s^2 + a2 s per sequence, b per group).
    A degree beyond the largest profiled one, D, takes D's timings scaled by D/degree (compute and all-to-all
    volume per device both shrink with the group) and D's b: never the formula, which a profile of slower
    devices would contradict (an unprofiled degree 8 would look faster than a profiled 4 by far)."""
    model_shape: dict[str, int] = field(default_factory=dict)
    """The model the figures were measured on: dim, n_layers, n_heads, kv_heads, vocab_size (the keys of
    trainers.config.ModelConfig.shape); empty when unknown. A config whose model differs is refused unless it
    names this cost model explicitly (orchestrator.config)."""

    def __post_init__(self) -> None:
        if self.devices_per_node < 1 or self.devices_per_node & (self.devices_per_node - 1):
            raise ValueError(f"devices_per_node = {self.devices_per_node}: must be a power of two")
        for d in self.alltoall_gbps:
            if d < 2 or d & (d - 1):
                raise ValueError(f"alltoall_gbps has degree {d}: degrees are powers of two from 2")

    def model_state_bytes(self, devices: int) -> float:
        """What one device holds of the model's weights, gradients and optimizer state, in an SP domain of
        `devices`."""
        total = self.param_count * self.state_bytes_per_param
        return total / devices if self.states_sharded else total

    def max_tokens(self, degree: int, devices: int) -> float:
        """Tokens a group of `degree` devices can hold in one micro-batch, within an SP domain of `devices`."""
        free = self.memory_cap_bytes - self.model_state_bytes(devices)
        per_device = max(0.0, free / self.activation_bytes_per_token)
        if self.token_cap_per_device is not None:
            per_device = min(per_device, self.token_cap_per_device)
        return per_device * degree

    def bandwidth(self, degree: int) -> float:
        """GB/s of a degree-`degree` all-to-all; a degree beyond the profiled ones takes the largest profiled."""
        if degree in self.alltoall_gbps:
            return self.alltoall_gbps[degree]
        known = sorted(self.alltoall_gbps)
        if not known:
            raise ValueError(f"cost model {self.name!r} has no all-to-all bandwidth for degree {degree}")
        below = [d for d in known if d <= degree]
        return self.alltoall_gbps[below[-1] if below else known[0]]

    def alltoall_ms(self, length: float, degree: int) -> float:
        """The bandwidth term of one sequence's all-to-alls (their latency is the group's: fixed_ms)."""
        if degree == 1:
            return 0.0
        sent = length / degree * (degree - 1) / degree * self.alltoall_bytes_per_token
        return sent / (self.bandwidth(degree) * 1e9) * 1e3

    def _measured(self, degree: int) -> tuple[float, float, float] | None:
        """Profiled (a1, a2, b) for `degree`, extrapolated past the largest profiled degree; None: the formula."""
        if degree in self.measured_ms:
            return self.measured_ms[degree]
        largest = max(self.measured_ms, default=None)
        if largest is None or degree < largest:
            return None
        a1, a2, b = self.measured_ms[largest]
        return a1 * largest / degree, a2 * largest / degree, b

    def fixed_ms(self, degree: int) -> float:
        """A group's cost in a micro-batch however many sequences it runs: b, and its all-to-all calls' latency."""
        measured = self._measured(degree)
        if measured is not None:
            return measured[2]
        latency = self.alltoall_calls * self.alltoall_latency_ms.get(degree, 0.0) if degree > 1 else 0.0
        return self.overhead_ms + latency

    def sequence_ms(self, length: float, degree: int) -> float:
        """One sequence's forward+backward on a group of `degree`, without the group's fixed cost."""
        measured = self._measured(degree)
        if measured is not None:
            a1, a2, _ = measured
            return a1 * length * length + a2 * length
        compute = (self.attention_ms_per_token2 * length * length + self.linear_ms_per_token * length) / degree
        return compute + self.alltoall_ms(length, degree)

    def group_ms(self, lengths, degree: int) -> float:
        """A group's time in one micro-batch: its fixed cost plus its sequences'."""
        return self.fixed_ms(degree) + sum(self.sequence_ms(s, degree) for s in lengths)

    def with_token_cap(self, tokens: float | None) -> "CostModel":
        return replace(self, token_cap_per_device=tokens)

    def to_json(self) -> str:
        data = asdict(self)
        data["alltoall_gbps"] = {str(k): v for k, v in self.alltoall_gbps.items()}
        data["alltoall_latency_ms"] = {str(k): v for k, v in self.alltoall_latency_ms.items()}
        data["measured_ms"] = {str(k): list(v) for k, v in self.measured_ms.items()}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        data = json.loads(text)
        for key in ("alltoall_gbps", "alltoall_latency_ms"):
            data[key] = {int(k): float(v) for k, v in data.get(key, {}).items()}
        data["measured_ms"] = {int(k): tuple(float(x) for x in v) for k, v in data.get("measured_ms", {}).items()}
        data["model_shape"] = {str(k): int(v) for k, v in data.get("model_shape", {}).items()}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"cost model JSON has unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def _flexsp_7b() -> CostModel:
    """FlexSP's published Llama-7B figures (A100 40GB, 8 GPUs a node): a1, a2, b from its profiled cost
    model, 4.48 MB of activations per token, a 28 GB cap, ZeRO-3 model states (16 B/param over all devices),
    and its measured all-to-all bandwidth by degree. Bytes per token: 8 all-to-alls x 32 layers x hidden
    4096 x 2 B (bf16) = 2 MiB. Its model is Llama-7B: 32 layers of hidden 4096, 32 heads (no grouped-query
    attention), a 32,000-token vocabulary."""
    return CostModel(name="flexsp-7b", attention_ms_per_token2=5.128e-6, linear_ms_per_token=0.184, overhead_ms=629.0,
                     activation_bytes_per_token=4.48 * MB, memory_cap_bytes=28 * GB, param_count=6_738_415_616,
                     alltoall_bytes_per_token=8 * 32 * 4096 * 2, alltoall_calls=8 * 32,
                     alltoall_gbps={2: 119.5, 4: 104.1, 8: 96.5, 16: 10.3, 32: 5.9, 64: 4.9}, devices_per_node=8,
                     model_shape={"dim": 4096, "n_layers": 32, "n_heads": 32, "kv_heads": 32, "vocab_size": 32000})


BUILTIN = {"flexsp-7b": _flexsp_7b}


def load_cost_model(name_or_path: str) -> CostModel:
    """A built-in cost model by name, or a JSON file written by `flotilla profile`."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path!r} is neither a built-in cost model ({', '.join(BUILTIN)}) nor a file")
    return CostModel.from_json(path.read_text())


def builtins_for(shape: dict[str, int]) -> list[str]:
    """The built-in cost models made for a model of `shape` (trainers.config.ModelConfig.shape)."""
    return [name for name, make in BUILTIN.items() if make().model_shape == shape]


def format_shape(shape: dict[str, int]) -> str:
    """'dim=4096, n_layers=32, ...' for messages; 'unknown' for an empty shape."""
    return ", ".join(f"{k}={v}" for k, v in shape.items()) or "unknown"


def is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def degrees_up_to(devices: int) -> list[int]:
    """Group degrees an SP domain of `devices` can hold: 1, 2, 4, ... up to the largest power of two in it."""
    return [2**i for i in range(int(math.log2(devices)) + 1)] if devices >= 1 else []
