"""Self-Tuning Networks (MacKay et al. 2019, "Self-Tuning Networks: Bilevel Optimization of Hyperparameters
using Structured Best-Response Functions"): the network learns its own regularisation hyperparameters online.

The hyperparameters lambda (dropout at embedding / attention / residual, decoupled weight decay, and input
noise: the probability of replacing an input token with a random one) live in an unconstrained space h:
dropout and noise are sigmoid(h), weight decay is exp(h). The network approximates the best response
w*(lambda) around the current hyperparameters by gating every linear layer of the blocks on the
perturbation h - hyper (structured best-response, linear in the neighbourhood weight steps sample from):

    y = W x * (1 + U (h - hyper))      U: (out_features, K), zero at init; at h = hyper the plain model

Training alternates (sec. 4 of the paper):
  1. weight steps on training batches, at h~ = h + sigma * eps sampled around the current hyperparameters:
     the weights and the gates U learn to be good for every lambda in that neighbourhood;
  2. every `hyper_every` weight steps, a hyperparameter step on a validation batch: regularisation off
     (no dropout, no noise), the loss at h + sigma * eps (reparametrised) minus `entropy_weight` times the
     Gaussian's entropy, differentiated w.r.t. h and log sigma through the gates only. The training loss is
     never differentiated w.r.t. lambda, which is why dropout rates can be tuned at all.

Single process only: the hyperparameters are one small tensor that every data-parallel rank would have to
agree on, which this first version does not do.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainers.attention import get_attention
from trainers.checkpoint import TrainState
from trainers.config import TrainerConfig
from trainers.data import Batch, BatchPlan, build_splits, validation_rows
from trainers.engines import FSDPEngine
from trainers.loop import Trainee, token_loss_sum, train_step
from trainers.loop import train as loop_train
from trainers.model import Transformer, build_model
from trainers.pretrained import initialise
from trainers.parallel import device_for
from trainers.reporter import Reporter

RATES = ("dropout_embed", "dropout_attn", "dropout_resid", "input_noise")
"""Hyperparameters in (0, 1): sigmoid of their unconstrained value. weight_decay is exp of its value."""
GATED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
"""The block linears whose outputs are gated on the hyperparameters."""


def constrain(name: str, h: Tensor) -> Tensor:
    """Unconstrained value -> hyperparameter: rates through a sigmoid, weight decay through exp."""
    return torch.sigmoid(h) if name in RATES else torch.exp(h)


def unconstrain(name: str, value: float) -> float:
    return math.log(value / (1 - value)) if name in RATES else math.log(value)


def initial_value(name: str, settings: Any) -> float:
    if name.startswith("dropout_"):
        return settings.init_dropout
    return settings.init_weight_decay if name == "weight_decay" else settings.init_input_noise


class STNTransformer(nn.Module):
    """A Transformer whose block linears are gated on the hyperparameters it is conditioned on.

    `hyper` (K,) is the current unconstrained hyperparameters and `log_scale` (K,) the log standard deviation
    of the neighbourhood weight steps sample from; both are parameters (so checkpoints carry them) that only
    the hyperparameter step updates. Call `condition(h)` before a forward pass: h (K,) feeds the gates (with
    its gradient, in the hyperparameter step) and sets the dropout and noise rates used in train mode.
    """

    def __init__(self, base: Transformer, tuned: list[str], init: dict[str, float], perturb_scale: float):
        super().__init__()
        self.base, self.tuned = base, list(tuned)
        device = base.tok_embeddings.weight.device
        k = len(self.tuned)
        self.hyper = nn.Parameter(torch.tensor([unconstrain(n, init[n]) for n in self.tuned], device=device))
        self.log_scale = nn.Parameter(torch.full((k,), math.log(perturb_scale), device=device))
        self.gates = nn.ModuleDict()
        for name, module in base.layers.named_modules():
            if name.split(".")[-1] in GATED:
                gate = nn.Linear(k, module.out_features, bias=False, device=device)
                nn.init.zeros_(gate.weight)
                self.gates[name.replace(".", "_")] = gate
                module.register_forward_hook(self._gate_hook(gate))
        self._h: Tensor | None = None
        self.input_noise = 0.0

    def _gate_hook(self, gate: nn.Linear):
        def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            # Centred on the current hyperparameters: the gates see only h - hyper, the perturbation, so they
            # learn the best response's slope around hyper. Fed h itself (about -3 for a rate of 0.05, the same
            # in every dimension), U h acted as a free per-channel gain that the hyperparameter step then fitted
            # to validation rows: every hyperparameter moved in lockstep, whatever its effect.
            return out * (1 + gate((self._h - self.hyper.detach()).to(out.dtype)))  # (..., out) * (out,)
        return hook

    def value(self, name: str, h: Tensor | None = None) -> float:
        """Hyperparameter `name` at h (default: the current hyperparameters); untuned ones read the base config."""
        if name not in self.tuned:
            return getattr(self.base.cfg, name, 0.0)
        h = self.hyper if h is None else h
        return float(constrain(name, h[self.tuned.index(name)].detach()))

    def condition(self, h: Tensor) -> None:
        self._h = h
        self.base.embed_dropout.p = self.value("dropout_embed", h)
        for layer in self.base.layers:
            layer.attention.dropout_p = self.value("dropout_attn", h)
            layer.resid_dropout.p = self.value("dropout_resid", h)
        self.input_noise = self.value("input_noise", h)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """h + sigma * eps, eps ~ N(0, I), with gradient to hyper and log_scale (reparametrised)."""
        eps = torch.randn(self.hyper.shape, generator=generator, device=self.hyper.device)
        return self.hyper + self.log_scale.exp() * eps

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        """As Transformer.forward; in train mode a share `input_noise` of the input tokens is replaced by
        uniformly random ones (the targets stay: the model must predict through the noise)."""
        if self._h is None:
            raise RuntimeError("STNTransformer: call condition(h) before the forward pass")
        if self.training and self.input_noise > 0:
            noisy = torch.rand(tokens.shape, device=tokens.device) < self.input_noise
            tokens = torch.where(noisy, torch.randint_like(tokens, self.base.cfg.vocab_size), tokens)
        return self.base(tokens, positions, cu_seqlens, max_seqlen)


def build_stn_model(cfg: TrainerConfig, settings: Any, device: torch.device | str = "cpu") -> STNTransformer:
    base = build_model(cfg.model, device="meta", attention_fn=get_attention(cfg.model.attention))
    base.to_empty(device=device)
    initialise(base, cfg.model, cfg.train.seed)
    init = {name: initial_value(name, settings) for name in settings.tuned}
    model = STNTransformer(base, settings.tuned, init, settings.perturb_scale)
    model.condition(model.hyper.detach())
    return model


def build_stn_optimizer(model: STNTransformer, cfg: TrainerConfig, settings: Any) -> torch.optim.AdamW:
    """One AdamW, three groups, so one checkpoint holds every moment: base matrices (their weight decay is
    set each weight step from the sampled lambda, or the config's if weight_decay is not tuned), vectors and
    gates (no decay), and the hyperparameters (lr = hyper_lr, stepped only by the hyperparameter step)."""
    decay = [p for p in model.base.parameters() if p.ndim >= 2]
    vectors = [p for p in model.base.parameters() if p.ndim < 2]
    return torch.optim.AdamW([
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": vectors + list(model.gates.parameters()), "weight_decay": 0.0},
        {"params": [model.hyper, model.log_scale], "weight_decay": 0.0, "lr": settings.hyper_lr},
    ], lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)


def build(cfg: TrainerConfig, use_gpu: bool = False, *, settings: Any) -> Trainee:
    """The STN trainee; `settings` is tune.config.STNSettings (anything with its fields)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"STN trials run on one process, got a world of {dist.get_world_size()}: "
                         "set cluster.num_workers = 1")
    device = device_for(0, use_gpu)
    train_rows, val_rows, _ = build_splits(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # perturbations, dropout and input noise
    model = build_stn_model(cfg, settings, device)
    engine = FSDPEngine(model, build_stn_optimizer(model, cfg, settings), cfg.train.grad_clip)
    return Trainee(cfg, engine, train_rows, val_rows, device)


def hyper_step(t: Trainee, settings: Any, rows: list[int]) -> float:
    """One hyperparameter step on validation rows, regularisation off; returns the validation loss."""
    model: STNTransformer = t.model
    # The loop sets every group's lr from the weights' schedule; h and log sigma step at hyper_lr, which PBT
    # may change between segments (so it is not taken from the checkpoint either).
    t.optimizer.param_groups[2]["lr"] = settings.hyper_lr
    batch = t.val_rows.batch(rows).to(t.device)
    model.eval()  # no dropout, no input noise
    model.condition(model.sample())
    loss = token_loss_sum(t, batch) / batch.num_targets
    entropy = model.log_scale.sum()  # a diagonal Gaussian's entropy, up to a constant
    hyper_grads = torch.autograd.grad(loss - settings.entropy_weight * entropy, [model.hyper, model.log_scale])
    model.hyper.grad, model.log_scale.grad = hyper_grads
    t.optimizer.step()  # the weight groups hold no gradients here, so only h and log sigma move
    t.optimizer.zero_grad(set_to_none=True)
    model.train()
    return float(loss.detach())


def hyper_rows(t: Trainee, k: int) -> list[int]:
    """Validation rows of the k-th hyperparameter step: cycling through the rows after those `validate`
    reads, so the reported val_loss stays a measurement on rows the hyperparameters were not fitted to
    (the STN paper fits on validation data and reports on held-out test data). A validation split too small
    to spare rows is shared, as it must be."""
    mbs, n = t.cfg.train.micro_batch_size, len(t.val_rows)
    measured = sum(len(b) for b in validation_rows(n, mbs, t.cfg.train.val_batches, 0, 1))
    offset = measured if n - measured >= mbs else 0
    return [offset + (k * mbs + i) % (n - offset) for i in range(mbs)]


def hyper_metrics(model: STNTransformer) -> dict[str, float]:
    out = {f"stn/{name}": model.value(name) for name in model.tuned}
    out |= {f"stn/scale_{name}": float(s) for name, s in zip(model.tuned, model.log_scale.detach().exp())}
    return out


def stn_step(t: Trainee, plan: BatchPlan, step: int, batches: list[Batch] | None, *, settings: Any) -> tuple[float, float, int, dict]:
    """trainers.loop's step function for an STN: a weight step at hyperparameters sampled around the current
    ones, every `hyper_every` steps a hyperparameter step, and the model left conditioned on the current
    hyperparameters, where the loop's validation measures it."""
    model: STNTransformer = t.model
    h = model.sample().detach()
    model.condition(h)
    if "weight_decay" in model.tuned:
        t.optimizer.param_groups[0]["weight_decay"] = model.value("weight_decay", h)
    loss, grad_norm, n_tokens, metrics = train_step(t, plan, step, batches)
    done = step + 1
    if done % settings.hyper_every == 0:
        metrics["stn/hyper_loss"] = hyper_step(t, settings, hyper_rows(t, done // settings.hyper_every))
    model.condition(model.hyper.detach())
    return loss, grad_norm, n_tokens, metrics | hyper_metrics(model)


def train(t: Trainee, reporter: Reporter, *, settings: Any) -> TrainState:
    """trainers.loop.train with the STN's step: restore, schedule, validation, reports and checkpoints as there."""
    return loop_train(t, reporter, functools.partial(stn_step, settings=settings))
