"""FusedAdamW: AdamW whose step is one kernel launch over every parameter.

How one launch covers many tensors: each step builds a table of raw addresses (param, grad, exp_avg,
exp_avg_sq) and per-tensor hyperparameters; the tensors are cut into BLOCK-element chunks and program i
updates chunk i of tensor chunk_tensor[i], loading that tensor's pointers from the table. Only the address
and hyperparameter tables (a few KB) cross to the device each step; the chunk map depends only on the
tensor sizes and is cached. Tensors of different dtypes or devices go to separate launches (one per kind,
so one in a uniform model).

Gradient clipping is folded in: with max_grad_norm, a first launch over the same table writes each chunk's
sum of squared gradients, the global norm is reduced on the device, and the update kernel multiplies every
gradient by min(1, max_grad_norm / (norm + 1e-6)) as it loads it (torch.nn.utils.clip_grad_norm_'s formula);
no gradient is rewritten and nothing waits for the host.

FSDP2 (DTensor parameters): the kernels update each parameter's local shard (`to_local()`); the state
tensors are DTensors like the parameters, as torch.optim.AdamW keeps them, so DCP saves and reshards them.
The clipping norm is global: local sums of squares are summed over the mesh dimensions each gradient is
sharded on (an all-reduce), and not over those it is replicated on. Pipeline stages own different
parameters outside that mesh: with pp > 1 the norm covers this stage only.

DeepSpeed: a plain torch.optim.Optimizer (param_groups, state, state_dict) with the same state layout as
torch.optim.AdamW (step, exp_avg, exp_avg_sq), so it serves as a client optimizer and checkpoints load
across the two.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from kernels._triton import INTERPRET, dispatch, tl, triton

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Partial, Replicate
else:  # a torch build without distributed: no parameter can be a DTensor
    DTensor = Partial = Replicate = None

# 4096 elements over 8 warps: 16 per thread, four 128-bit accesses per fp32 array; at 1.2B parameters,
# 300k programs, and the chunk map (12 bytes a chunk) is 0.01% of the 28 bytes a parameter moves.
# Interpreter: small chunks so test tensors span several, with a masked tail.
BLOCK = 256 if INTERPRET else 4096
NUM_WARPS = 1 if INTERPRET else 8
# Hyperparameter table: one float32 row per tensor, computed in float64 on the host. 1 - beta is a column of
# its own: float32(0.999) is 0.99900001, and 1 minus it would be 1.3e-5 off in relative terms.
_HYPER = ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size",
          "bias_correction2_sqrt")
_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@triton.jit
def _stochastic_round_bf16(x, rand):
    """float32 -> bfloat16 rounding up with probability (dropped bits / 2^16): unbiased in expectation."""
    bits = x.to(tl.uint32, bitcast=True) + (rand & 0xFFFF)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _chunk(CHUNK_TENSOR, CHUNK_START, NUMELS, PTRS, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
           BLOCK: tl.constexpr):
    """This program's tensor index, element offsets, element count, and the tensor's pointer in `column`."""
    pid = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + pid)
    start = tl.multiple_of(tl.load(CHUNK_START + pid), BLOCK)
    n = tl.load(NUMELS + t)
    ptr = tl.load(PTRS + t * 4 + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address in the table is 16-byte aligned: allows 128-bit accesses
        ptr = tl.multiple_of(ptr, 16)
    return t, start + tl.arange(0, BLOCK), start, n, ptr


@triton.jit
def _grad_sq_norm_kernel(PTRS, CHUNK_TENSOR, CHUNK_START, NUMELS, PARTIAL, GRAD_TY: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """PARTIAL[chunk] = sum of the chunk's squared gradients, float32."""
    t, offs, start, n, g_ptr = _chunk(CHUNK_TENSOR, CHUNK_START, NUMELS, PTRS, 1, GRAD_TY, ALIGNED, BLOCK)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(PARTIAL + tl.program_id(0), tl.sum(g * g, 0))


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                 bc2_sqrt, clip, seed, rand_offs, MASKED: tl.constexpr, STOCHASTIC_ROUND: tl.constexpr):
    if MASKED:
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs).to(tl.float32)
        v = tl.load(v_ptr + offs).to(tl.float32)
    g = g * clip
    # torch.optim.AdamW's order and forms: decoupled decay, lerp for m, mul+addcmul for v, then
    # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    if STOCHASTIC_ROUND:
        r0, r1, _, _ = tl.randint4x(seed, rand_offs)
        m_out = _stochastic_round_bf16(m, r0)
        v_out = _stochastic_round_bf16(v, r1)
    else:
        m_out = m.to(m_ptr.dtype.element_ty)
        v_out = v.to(v_ptr.dtype.element_ty)
    if MASKED:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m_out, mask=mask)
        tl.store(v_ptr + offs, v_out, mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty))
        tl.store(m_ptr + offs, m_out)
        tl.store(v_ptr + offs, v_out)


@triton.jit
def _fused_adamw_kernel(PTRS, HYPER, CHUNK_TENSOR, CHUNK_START, NUMELS, CLIP, seed,
                        PARAM_TY: tl.constexpr, MOMENT_TY: tl.constexpr, HAS_CLIP: tl.constexpr,
                        STOCHASTIC_ROUND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, start, n, p_ptr = _chunk(CHUNK_TENSOR, CHUNK_START, NUMELS, PTRS, 0, PARAM_TY, ALIGNED, BLOCK)
    g_ptr = tl.load(PTRS + t * 4 + 1).to(tl.pointer_type(PARAM_TY))
    m_ptr = tl.load(PTRS + t * 4 + 2).to(tl.pointer_type(MOMENT_TY))
    v_ptr = tl.load(PTRS + t * 4 + 3).to(tl.pointer_type(MOMENT_TY))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    h = HYPER + t * 8  # the columns of _HYPER
    decay = tl.load(h)
    one_minus_beta1 = tl.load(h + 2)
    beta2 = tl.load(h + 3)
    one_minus_beta2 = tl.load(h + 4)
    eps = tl.load(h + 5)
    step_size = tl.load(h + 6)
    bc2_sqrt = tl.load(h + 7)
    clip = tl.load(CLIP) if HAS_CLIP else 1.0
    # Random streams are indexed by position in the whole launch, so no two elements share one.
    rand_offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # Full chunks (all but each tensor's last) run unmasked, so aligned tensors get vector accesses.
    if start + BLOCK <= n:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                     step_size, bc2_sqrt, clip, seed, rand_offs, False, STOCHASTIC_ROUND)
    else:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                     step_size, bc2_sqrt, clip, seed, rand_offs, True, STOCHASTIC_ROUND)


def _local(t: Tensor) -> Tensor:
    """The tensor this rank stores: a DTensor's local shard (sharing its storage), else t itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _to_device(table: Tensor, device: torch.device) -> Tensor:
    """A small host table on the device; to CUDA through pinned memory without blocking the host, so queuing the
    step does not wait for the backward still running."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _norm_key(grad: Tensor):
    """Which local sums of squares are summed together before the mesh reduction: None for plain tensors,
    (mesh, placements) for DTensors."""
    if DTensor is None or not isinstance(grad, DTensor):
        return None
    if any(p.is_partial() for p in grad.placements):
        raise ValueError(f"FusedAdamW: a gradient has placements {grad.placements}; Partial gradients must be "
                         f"reduced before the optimizer step")
    return grad.device_mesh, tuple(grad.placements)


def _stochastic_round_bf16_torch(x: Tensor, generator: torch.Generator) -> Tensor:
    """The fallback's version of _stochastic_round_bf16: x float32 -> bfloat16, unbiased."""
    rand = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.view(torch.int32) + rand) & -65536).view(torch.float32).to(torch.bfloat16)


class _Bucket:
    """The tensors of one launch: same device, param dtype and moment dtype. Lists hold local tensors."""

    def __init__(self):
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs = [], [], [], []
        self.hyper: list[tuple[float, ...]] = []
        self.norm_keys: list = []
        self.steps: list[int] = []


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) in one fused pass over all parameters.

    Example::

        opt = FusedAdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)
        loss.backward(); opt.step(); opt.zero_grad()
        opt.grad_norm  # the global gradient norm before clipping, a device scalar (with max_grad_norm)

    Args:
        lr, betas, eps, weight_decay: as torch.optim.AdamW (per param group).
        max_grad_norm: clip the global gradient norm to this, inside the step (None: no clipping). The
            gradients themselves are left unscaled; only the update sees the clipped values.
        moments_dtype: torch.float32 (default) or torch.bfloat16 for exp_avg and exp_avg_sq.

    bfloat16 moments halve the optimizer state (8 -> 4 bytes a parameter) and its traffic, at a cost in
    accuracy. bf16 keeps 8 significant bits: a step moves exp_avg_sq by (1 - beta2) = 0.1% of itself, below
    half a bf16 unit (0.2-0.4%), so round-to-nearest would freeze exp_avg_sq, which could then never decrease.
    The moments are therefore written with stochastic rounding (round up with probability equal to the
    dropped fraction: unbiased, as in Zamirai et al., "Revisiting BFloat16 Training", 2020), so they follow
    their float32 values in expectation with a per-element noise of about 0.4% (one bf16 unit). Measured in
    tests/unit/kernels/test_fused_adamw.py: after 30 steps on random data the parameters' updates stay within
    3% (relative L2) of float32-moment AdamW's. The parameters themselves keep their dtype and are rounded
    to nearest, as torch.optim.AdamW does.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, max_grad_norm: float | None = None,
                 moments_dtype: torch.dtype = torch.float32):
        if not 0.0 <= lr:
            raise ValueError(f"FusedAdamW: lr={lr} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamW: betas={betas} must each be in [0, 1)")
        if not 0.0 <= eps:
            raise ValueError(f"FusedAdamW: eps={eps} must be >= 0")
        if not 0.0 <= weight_decay:
            raise ValueError(f"FusedAdamW: weight_decay={weight_decay} must be >= 0")
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"FusedAdamW: max_grad_norm={max_grad_norm} must be > 0, or None for no clipping")
        if moments_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"FusedAdamW: moments_dtype={moments_dtype}; allowed: torch.float32, torch.bfloat16")
        # torch.optim.AdamW's remaining group keys, at the values this optimizer implements: a checkpoint's
        # param_groups then carry the keys either optimizer expects, and a run can switch between them.
        adamw_keys = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                          fused=None, decoupled_weight_decay=True)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **adamw_keys))
        self.max_grad_norm = max_grad_norm
        self.moments_dtype = moments_dtype
        self.grad_norm: Tensor | None = None
        self._chunk_maps: dict = {}
        # Optimizer.load_state_dict casts state to the parameter's dtype; moments go back to moments_dtype.
        self.register_load_state_dict_post_hook(FusedAdamW._restore_moment_dtype)

    @staticmethod
    def _restore_moment_dtype(optimizer: FusedAdamW) -> None:
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != optimizer.moments_dtype:
                    state[key] = state[key].to(optimizer.moments_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        if not buckets:
            return loss
        clip = None
        if self.max_grad_norm is not None:
            self.grad_norm = self._global_grad_norm(buckets)
            clip = (self.max_grad_norm / (self.grad_norm + 1e-6)).clamp(max=1.0).float()
        for index, ((device, _, _), bucket) in enumerate(buckets.items()):
            # Stochastic rounding's seed depends only on the step count (kept in the state) and the launch: a
            # resumed run rounds as an uninterrupted one would, and no global RNG is consumed.
            seed = (0x9E3779B1 * max(bucket.steps) + 0x632BE5AB * index) % (2**31 - 1)
            if dispatch("fused_adamw", device) == "triton":
                self._update_triton(bucket, clip, seed)
            else:
                self._update_torch(bucket, clip, seed)
        return loss

    def _buckets(self) -> dict[tuple, _Bucket]:
        """Initialise state, advance step counts, and sort the parameters with gradients into launches."""
        buckets: dict[tuple, _Bucket] = defaultdict(_Bucket)
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):  # e.g. param groups loaded from torch's AdamW
                raise ValueError("FusedAdamW implements neither amsgrad nor maximize; a param group asks for one")
            lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise ValueError("FusedAdamW supports dense real parameters and gradients only")
                if p.grad.dtype != p.dtype:
                    raise ValueError(f"FusedAdamW: a gradient is {p.grad.dtype} but its parameter {p.dtype}; "
                                     f"they must match")
                if p.dtype not in _TL_DTYPES:
                    raise ValueError(f"FusedAdamW: parameter dtype {p.dtype}; allowed: "
                                     f"{', '.join(map(str, _TL_DTYPES))}")
                state = self.state[p]
                if not state:  # the layout of torch.optim.AdamW's state, DTensors for DTensor parameters
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())
                local = _local(p)
                if local.numel() == 0:  # an FSDP2 shard can be empty on some ranks
                    continue
                # float64 on the host, rounded once to float32 in the table
                bias_correction1 = 1.0 - beta1 ** step
                bias_correction2 = 1.0 - beta2 ** step
                bucket = buckets[(local.device, local.dtype, state["exp_avg"].dtype)]
                bucket.params.append(local)
                bucket.grads.append(_local(p.grad))
                bucket.exp_avgs.append(_local(state["exp_avg"]))
                bucket.exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                bucket.hyper.append((1.0 - lr * wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
                                     lr / bias_correction1, math.sqrt(bias_correction2)))
                bucket.norm_keys.append(_norm_key(p.grad))
                bucket.steps.append(step)
        return buckets

    def _global_grad_norm(self, buckets: dict[tuple, _Bucket]) -> Tensor:
        """sqrt of the sum of squares of every gradient, over all ranks holding a shard of it."""
        keys = list(dict.fromkeys(k for bucket in buckets.values() for k in bucket.norm_keys))
        first_device = next(iter(buckets))[0]
        sums = torch.zeros(len(keys), dtype=torch.float32, device=first_device)  # one local sum per key
        for (device, _, _), bucket in buckets.items():
            key_of_tensor = _to_device(torch.tensor([keys.index(k) for k in bucket.norm_keys]), device)
            if dispatch("fused_adamw", device) == "triton":
                partial, key_of_partial = self._launch_norm(bucket), key_of_tensor[self._chunk_map(bucket)[0].long()]
            else:
                partial, key_of_partial = torch.stack([g.float().pow(2).sum() for g in bucket.grads]), key_of_tensor
            # (keys, partials) selection summed along partials: deterministic, unlike an atomic index_add_
            select = key_of_partial[None, :] == torch.arange(len(keys), device=device)[:, None]
            sums += torch.where(select, partial[None, :], 0.0).sum(1).to(first_device)
        total = torch.zeros((), dtype=torch.float32, device=first_device)
        for key, local_sum in zip(keys, sums):
            if key is not None:
                mesh, placements = key
                # A sum over shards is a Partial value on the sharded mesh dims; full_tensor all-reduces it
                # there, and only there (a replicated dim already holds the whole sum).
                local_sum = DTensor.from_local(local_sum.reshape(()), mesh,
                                               [Partial() if p.is_shard() else Replicate() for p in placements],
                                               run_check=False).full_tensor()
            total = total + local_sum.to(first_device)
        return total.sqrt()

    # --- Triton path --------------------------------------------------------------------------------------

    def _chunk_map(self, bucket: _Bucket) -> tuple[Tensor, Tensor, Tensor]:
        """(chunk -> tensor index int32, chunk -> first element int64, tensor numels int64), cached by sizes."""
        numels = tuple(t.numel() for t in bucket.params)
        device = bucket.params[0].device
        key = (device, bucket.params[0].dtype, numels)
        if key not in self._chunk_maps:
            counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels])
            tensor_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), counts)
            first_chunk = torch.cumsum(counts, 0) - counts
            start = (torch.arange(int(counts.sum())) - first_chunk[tensor_of_chunk]) * BLOCK
            self._chunk_maps = {k: v for k, v in self._chunk_maps.items() if k[:2] != key[:2]}  # sizes changed
            self._chunk_maps[key] = (tensor_of_chunk.to(torch.int32).to(device), start.to(torch.int64).to(device),
                                     torch.tensor(numels, dtype=torch.int64, device=device))
        return self._chunk_maps[key]

    @staticmethod
    def _pointer_table(bucket: _Bucket) -> tuple[Tensor, bool]:
        """(tensors, 4) int64 addresses of param, grad, exp_avg, exp_avg_sq, and whether all are 16-byte aligned."""
        for name, tensors in (("parameter", bucket.params), ("gradient", bucket.grads),
                              ("exp_avg", bucket.exp_avgs), ("exp_avg_sq", bucket.exp_avg_sqs)):
            for t in tensors:
                if not t.is_contiguous():
                    raise ValueError(f"FusedAdamW: a {name} of shape {tuple(t.shape)} is not contiguous; the fused "
                                     f"step walks each tensor as one flat range")
        ptrs = [t.data_ptr() for quad in zip(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs)
                for t in quad]
        table = _to_device(torch.tensor(ptrs, dtype=torch.int64), bucket.params[0].device)
        return table, all(p % 16 == 0 for p in ptrs)

    def _launch_norm(self, bucket: _Bucket) -> Tensor:
        chunk_tensor, chunk_start, numels = self._chunk_map(bucket)
        table, aligned = self._pointer_table(bucket)
        partial = torch.empty(chunk_tensor.numel(), dtype=torch.float32, device=table.device)
        _grad_sq_norm_kernel[(chunk_tensor.numel(),)](
            table, chunk_tensor, chunk_start, numels, partial,
            GRAD_TY=getattr(tl, _TL_DTYPES[bucket.grads[0].dtype]), ALIGNED=aligned, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
        return partial

    def _update_triton(self, bucket: _Bucket, clip: Tensor | None, seed: int) -> None:
        chunk_tensor, chunk_start, numels = self._chunk_map(bucket)
        table, aligned = self._pointer_table(bucket)
        device = table.device
        hyper = _to_device(torch.tensor(bucket.hyper, dtype=torch.float64).to(torch.float32), device)
        moment_dtype = bucket.exp_avgs[0].dtype
        _fused_adamw_kernel[(chunk_tensor.numel(),)](
            table, hyper, chunk_tensor, chunk_start, numels, clip if clip is not None else hyper, seed,
            PARAM_TY=getattr(tl, _TL_DTYPES[bucket.params[0].dtype]), MOMENT_TY=getattr(tl, _TL_DTYPES[moment_dtype]),
            HAS_CLIP=clip is not None, STOCHASTIC_ROUND=moment_dtype == torch.bfloat16, ALIGNED=aligned,
            BLOCK=BLOCK, num_warps=NUM_WARPS)

    # --- PyTorch fallback ---------------------------------------------------------------------------------

    def _update_torch(self, bucket: _Bucket, clip: Tensor | None, seed: int) -> None:
        generator = None
        if bucket.exp_avgs[0].dtype == torch.bfloat16:
            generator = torch.Generator(device=bucket.params[0].device)
            generator.manual_seed(seed)
        for p, g, m, v, (decay, _, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt) in zip(
                bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.hyper):
            g32 = g.float() if clip is None else g.float() * clip
            p32, m32, v32 = p.float(), m.float(), v.float()
            p32.mul_(decay)
            m32.lerp_(g32, one_minus_beta1)
            v32.mul_(beta2).addcmul_(g32, g32, value=one_minus_beta2)
            p32.addcdiv_(m32, (v32.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
            p.copy_(p32)
            if generator is not None:
                m.copy_(_stochastic_round_bf16_torch(m32, generator))
                v.copy_(_stochastic_round_bf16_torch(v32, generator))
            else:
                m.copy_(m32)
                v.copy_(v32)
