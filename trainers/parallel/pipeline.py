"""Pipeline parallelism over the mesh's `pp` axis, through torch.distributed.pipelining.

The model's layers are cut into pp * v contiguous stages (v = 2 for the interleaved schedule, else 1); pp rank
r runs stages r, r + pp, ... The rank keeps only its stages' modules, in a `PipelineShard` whose parameter
names are the whole model's (`layers.5.attention.wq.weight`, `tok_embeddings.weight` on the first stage,
`norm`/`output` on the last), so checkpoints reshard between pipeline and other layouts by name.

Each optimizer step's micro-batches (train.grad_accum of them) are the pipeline's micro-batches. The schedule
sends only activations between stages; the positions and document boundaries a stage needs for each micro-
batch are known to every rank (all pp ranks read the same rows), so each stage is handed them before the step
and takes them in order: every schedule runs a stage's micro-batches forward in increasing order.

The loss of a micro-batch is its summed token losses over the step's global target count, times the number
of token shards (the data-parallel gradient average undoes that), as trainers.loop does; the schedule is
told not to rescale (scale_grads=False). Only the last stage computes the loss: the summed loss is handed
to every stage of the pp group, so the loop sums it over the dp x sp ranks of any stage.

Inside a stage run tensor and sequence parallelism as without pipelining (trainers.run applies them to the
shard). Under sp a stage's micro-batch is the rank's slice of every row (trainers.parallel.sequence.
shard_sequence: its positions, the whole rows' cu_seqlens), and under tp the residual stream between blocks
is each rank's sequence shard as a plain tensor (the sequence-parallel norms take and give local tensors), so
what crosses a stage boundary is (rows, seq_len / (sp * tp), dim) on every rank, sent to the rank of the next
stage with the same dp, sp and tp coordinates: the fixed shape the schedules need.

Tied embeddings (model.tie_embeddings): the embedding is on the first stage and the output projection on the
last, different ranks. Each holds a copy, as Megatron-LM does: the last stage keeps its output projection
under two names, `output` and `tok_embeddings`, so its weight is `tok_embeddings.weight` (named_parameters
gives a module's weight under its first name), exactly as the tied whole model names it. Both copies are
therefore initialised alike (seeded by name), loaded alike from a pretrained directory or a checkpoint, and
checkpointed under the whole model's names. Their gradients are summed over the first and last stages'
ranks of the same dp, sp and tp coordinates (`tied_group`) before every optimizer step, so both copies take
the same update; the engine counts the weight once in the gradient norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from trainers.data import Batch
from trainers.loop import summed_cross_entropy
from trainers.config import stages_per_rank
from trainers.model import Transformer, rope_tables

def stage_layers(n_layers: int, n_stages: int, stage: int) -> range:
    per = n_layers // n_stages
    return range(stage * per, (stage + 1) * per)


class PipelineShard(nn.Module):
    """This rank's part of the model, under the whole model's parameter names."""

    def __init__(self, model: Transformer, stages: Sequence[int], n_stages: int):
        super().__init__()
        self.cfg = model.cfg
        self.stage_ids, self.n_stages = list(stages), n_stages
        first, last = 0 in stages, n_stages - 1 in stages
        self.parts: tuple[str, ...] = (("tok_embeddings",) if first else ()) + (("norm", "output") if last else ())
        """The whole model's modules outside the blocks that this rank runs (trainers.parallel.tensor and .fsdp
        parallelise just these)."""
        if first:
            self.tok_embeddings, self.embed_dropout = model.tok_embeddings, model.embed_dropout
        elif last and model.cfg.tie_embeddings:
            # registered first, so the tied weight is named tok_embeddings.weight (see the module docstring)
            self.tok_embeddings = model.output
        self.layers = nn.ModuleDict({str(i): model.layers[i] for s in stages
                                     for i in stage_layers(model.cfg.n_layers, n_stages, s)})
        if last:
            self.norm, self.output = model.norm, model.output
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def tied_weight(self) -> nn.Parameter | None:
        """This rank's copy of a tied embedding weight (first or last stage), else None."""
        if not self.cfg.tie_embeddings or not hasattr(self, "tok_embeddings"):
            return None
        return self.tok_embeddings.weight

    @torch.no_grad()
    def reset_rope(self) -> None:
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


@dataclass
class MicroBatchContext:
    positions: Tensor
    cu_seqlens: Tensor
    max_seqlen: int


class StageModule(nn.Module):
    """One pipeline stage: embeddings (first), its layers, norm and output (last). forward(x) takes tokens or
    the previous stage's activations; the micro-batch's positions and documents come from `contexts`."""

    def __init__(self, shard: PipelineShard, stage: int, n_stages: int):
        super().__init__()
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.layer_ids = [str(i) for i in stage_layers(shard.cfg.n_layers, n_stages, stage)]
        self.shard = [shard]  # a plain list: the shard's parameters are not registered twice
        self.contexts: list[MicroBatchContext] = []

    def forward(self, x: Tensor) -> Tensor:
        shard, ctx = self.shard[0], self.contexts.pop(0)
        h = shard.embed_dropout(shard.tok_embeddings(x)) if self.first else x
        cos = shard.rope_cos[ctx.positions].unsqueeze(2)
        sin = shard.rope_sin[ctx.positions].unsqueeze(2)
        for i in self.layer_ids:
            h = shard.layers[i](h, cos, sin, ctx.cu_seqlens, ctx.max_seqlen)
        return shard.output(shard.norm(h)).float() if self.last else h


class Pipeline:
    """This rank's stages and the schedule that runs them; what trainers.loop calls when parallel.pp > 1."""

    def __init__(self, shard: PipelineShard, group: dist.ProcessGroup, schedule: str, n_microbatches: int,
                 micro_batch: tuple[int, int], device: torch.device, tp: int = 1,
                 dtype: torch.dtype = torch.float32, tied_group: dist.ProcessGroup | None = None):
        """micro_batch: (rows, tokens of each row on this rank: seq_len / sp); tp: the tensor-parallel degree,
        whose ranks each hold 1/tp of those tokens between blocks; dtype: the activations' between stages (a
        receive buffer of another dtype would take the sent bytes as its own); tied_group: under tied embeddings,
        this rank and the one holding the other copy (`tied_group()`)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        self.group, self.device, self.n_stages, self.pp = group, device, shard.n_stages, dist.get_world_size(group)
        self.stages = {s: StageModule(shard, s, shard.n_stages) for s in shard.stage_ids}
        self.dim, self.tp, self.dtype = shard.cfg.dim, tp, dtype
        self.tied, self.tied_group = shard.tied_weight(), tied_group
        self._scale = 1.0
        # Shapes given up front (static mode): inferring them would run each stage once more on the first
        # micro-batch, out of the order the stages take their contexts in.
        rows, seq = micro_batch
        # requires_grad: gradients flow back
        hidden = torch.empty(self.hidden_shape(rows, seq), dtype=dtype, device="meta", requires_grad=True)
        tokens = torch.empty(rows, seq, dtype=torch.long, device="meta")
        logits = torch.empty(rows, seq, shard.cfg.vocab_size, device="meta")
        pipes = [PipelineStage(m, s, self.n_stages, device, group=group,
                               input_args=tokens if s == 0 else hidden,
                               output_args=logits if s == self.n_stages - 1 else hidden,
                               input_grads=None if s == 0 else hidden,
                               output_grads=None if s == self.n_stages - 1 else hidden)
                 for s, m in self.stages.items()]
        kwargs = {"n_microbatches": n_microbatches, "loss_fn": self._loss, "scale_grads": False}
        if schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(pipes, **kwargs)
        else:
            self.schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule](pipes[0], **kwargs)

    def hidden_shape(self, rows: int, seq: int) -> tuple[int, int, int]:
        """What one rank sends between stages for a micro-batch of `rows` rows of `seq` tokens on this rank."""
        return rows, seq // self.tp, self.dim

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return summed_cross_entropy(logits, targets) * self._scale

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stages

    def train_step(self, batches: list[Batch], scale: float) -> Tensor:
        """Forward and backward of one step's micro-batches, each micro-batch's summed token loss times
        `scale` backpropagated. Returns the step's summed token loss, on every stage (a collective of the pp
        group)."""
        for stage in self.stages.values():
            stage.contexts = [MicroBatchContext(b.positions, b.cu_seqlens, b.max_seqlen) for b in batches]
        self._scale = scale
        targets = torch.cat([b.targets for b in batches])
        losses: list[Tensor] = []
        if self.has_first:
            self.schedule.step(torch.cat([b.tokens for b in batches]), target=targets, losses=losses)
        else:
            self.schedule.step(target=targets, losses=losses)
        self._sum_tied_gradients()
        # `losses` is empty but on the rank holding the last stage
        total = sum(float(loss.detach()) for loss in losses) / scale
        return self._from_last_stage(torch.tensor(total, dtype=torch.float64, device=self.device))

    def _sum_tied_gradients(self) -> None:
        """A tied embedding's gradient is the sum of the embedding's (first stage) and the output projection's
        (last stage): each copy gets it. Both copies are laid out alike over dp x sp (FSDP, which has already
        reduced them over those ranks) and tp, so this rank's local shards add up element by element."""
        if self.tied is None:
            return
        grad = self.tied.grad
        if isinstance(grad, DTensor) and grad.placements != self.tied.placements:
            # TP's vocabulary-parallel embedding leaves its weight's gradient replicated over tp: this rank's
            # shard of it is what the other copy's gradient holds
            grad = self.tied.grad = grad.redistribute(self.tied.device_mesh, self.tied.placements)
        with torch.no_grad():
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group)

    def _from_last_stage(self, loss: Tensor) -> Tensor:
        """The last stage's `loss` (0 on the other ranks) on every rank of the pp group."""
        dist.all_reduce(loss, group=self.group)
        return loss

    @torch.no_grad()
    def forward_loss(self, batch: Batch) -> Tensor:
        """A batch's summed token loss, forward only, stage after stage over point-to-point sends; on every
        stage, as train_step."""
        ctx = MicroBatchContext(batch.positions, batch.cu_seqlens, batch.max_seqlen)
        h, loss = None, torch.zeros((), dtype=torch.float64, device=self.device)
        for s, stage in sorted(self.stages.items()):
            if s == 0:
                x = batch.tokens
            elif s - 1 in self.stages:
                x = h
            else:
                x = torch.empty(self.hidden_shape(*batch.tokens.shape), dtype=self.dtype, device=self.device)
                dist.recv(x, dist.get_global_rank(self.group, (s - 1) % self.pp), group=self.group)
            stage.contexts = [ctx]
            h = stage(x)
            if stage.last:
                loss = summed_cross_entropy(h, batch.targets).double()
            elif s + 1 not in self.stages:
                dist.send(h.contiguous(), dist.get_global_rank(self.group, (s + 1) % self.pp), group=self.group)
        return self._from_last_stage(loss)


def build_shard(model: Transformer, pp_rank: int, pp: int, schedule: str) -> PipelineShard:
    """This rank's shard of `model` (still on the meta device): stages pp_rank, pp_rank + pp, ... of pp * v."""
    n_stages = pp * stages_per_rank(schedule)
    return PipelineShard(model, range(pp_rank, n_stages, pp), n_stages)


def tied_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """The ranks holding a copy of the tied embedding together with this rank: the first and the last pp rank of
    this rank's pp group (same dp, sp and tp coordinates), Megatron-LM's embedding group; None for a middle stage.
    A collective: every rank calls it (new_group is, for every group, members or not); for pp = 2 it is the pp
    group itself."""
    pp = mesh["pp"]
    if pp.size() == 2:
        return pp.get_group()
    ranks = mesh.mesh.movedim(0, -1).reshape(-1, pp.size())  # one row per pp group, in pp order
    mine = None
    for row in ranks.tolist():
        group = dist.new_group([row[0], row[-1]])
        if dist.get_rank() in (row[0], row[-1]):
            mine = group
    return mine
