"""The executor of adaptive sequence parallelism: runs each step as the planner split it.

Every rank builds the same plan from the same lengths (the planner is pure and the step's sequences are a
pure function of (step, seed)), so no rank sends another its plan. The ranks do compare a 64-bit digest of it,
one all-gather per step before its first micro-batch: a rank that planned otherwise (another cost model file
on its node) would run other collectives than its peers, and the job would wait in them forever; instead it
stops, naming the step and the ranks. Per micro-batch every rank is in exactly one group (the degrees sum to
the devices): it packs its group's sequences end to end into one row, padded to a multiple of the degree,
keeps its contiguous 1/degree of that row (trainers.parallel.sequence.shard_sequence), and attention runs
Ulysses over the group's process group, or plainly for degree 1. Every rank runs one forward and backward per
micro-batch, which FSDP's per-block collectives over all ranks need: a group the plan left without sequences
runs on a row of padding, which carries no loss.

With parallel.dp_replicate = R the world is R SP domains of `devices` ranks each (domain r: ranks r * devices
and on, the mesh's order): the step's sequences are split between them (trainers.parallel.adaptive.domains) and
each runs its share as the plan of its own devices; every rank plans every domain, and the digest covers the
split, so the comparison above holds for the whole step. Groups never leave their domain, and FSDP's per-block
collectives run within it (HSDP), so "every rank" above is every rank of the domain: domains may run different
numbers of micro-batches (trainers.loop.adaptive_train_step defers the all-reduce between them to each one's
last).

Groups are capped at `max_degree` (trainers.parallel.adaptive.topology.max_group_degree: what the attention
heads split into and where the ranks really are, so no group straddles a node). Process groups for every
aligned group up to it (degree 2, 4, ... at offsets that are multiples of the degree) are created once at
start-up, in the same order on every rank, in every domain.

The plan of step n+1 is computed while step n runs, in a separate process: in a thread, the planner's Python
holds the GIL the training thread needs to launch its work. bench/sp_planning_overlap.py: beside 64-device,
1,000-sequence plans back to back, a dispatch-bound CPU step (a small transformer's forward, backward and AdamW)
took 30-43% longer with the planner in a thread (70-106 ms a step waiting for the GIL), 1-3% with it in a
process; with one plan a step, as here, 2-4% against 0-1%.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from trainers.attention import AttentionFn
from trainers.data import Batch
from trainers.documents import DocumentBatches, DocumentSequences
from trainers.parallel.adaptive.cost import CostModel, degrees_up_to
from trainers.parallel.adaptive.domains import DomainPlans, plan_domains
from trainers.parallel.sequence import shard_sequence, ulysses


def aligned_groups(devices: int, max_degree: int) -> list[tuple[int, ...]]:
    """Every aligned group of degree 2 .. max_degree over `devices` ranks, smallest degree first: the only
    groups the planner lays out (largest first at consecutive offsets, so each starts at a multiple of its
    degree)."""
    return [tuple(range(first, first + degree)) for degree in degrees_up_to(min(devices, max_degree))[1:]
            for first in range(0, devices - degree + 1, degree)]


class GroupRouter:
    """The process group of every aligned SP group up to `max_degree` in each of `domains` SP domains of `devices`
    ranks (keyed by their ranks in the world), and the one the current micro-batch runs in."""

    def __init__(self, devices: int, max_degree: int | None = None, domains: int = 1):
        self.devices = devices
        self.max_degree = degrees_up_to(devices)[-1] if max_degree is None else max_degree
        # dist.new_group is a collective: every rank creates the same groups in the same order
        in_domain = aligned_groups(devices, self.max_degree)
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {
            ranks: dist.new_group(list(ranks)) for domain in range(domains)
            for ranks in (tuple(domain * devices + r for r in local) for local in in_domain)}
        self.current: dist.ProcessGroup | None = None
        """None: a degree-1 group, attention on this rank alone. Left set through the backward pass, which
        recomputes blocks under activation checkpointing."""

    def route(self, ranks: tuple[int, ...]) -> None:
        if len(ranks) == 1:
            self.current = None
            return
        group = self.groups.get(tuple(ranks))
        if group is None:
            raise ValueError(f"the plan puts ranks {ranks[0]}-{ranks[-1]} in one SP group, but only aligned groups of "
                             f"degree at most {self.max_degree} exist on these {self.devices} ranks of an SP domain "
                             f"(the attention heads' and the nodes' cap, trainers.parallel.adaptive.topology): plan "
                             f"with max_degree = {self.max_degree}")
        self.current = group

    def attention(self, inner: AttentionFn) -> AttentionFn:
        def routed(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
            if self.current is None:
                return inner(q, k, v, **kwargs)
            return ulysses(inner, self.current, q, k, v, **kwargs)

        return routed


def _digest(value: object) -> int:
    """A signed 64-bit BLAKE2b digest of repr(value) (ints and tuples of them: the same on every rank)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "big", signed=True)


def plan_digest(ids: list[int], lengths: list[int], plans: DomainPlans) -> int:
    """What every rank must hold identically before it runs a step: the step's sequences (their ids and
    lengths, the planner's input), each domain's share of them, and every micro-batch's groups (degree, ranks,
    sequences) in each domain. The estimates are left out: ranks that agree on the work may differ in them
    without harm."""
    layouts = tuple(tuple(tuple((g.degree, tuple(g.ranks), tuple(g.sequences)) for g in m.groups)
                          for m in plan.micro_batches) for plan in plans.plans)
    return _digest((tuple(map(int, ids)), tuple(map(int, lengths)), plans.devices, plans.shares, layouts))


def _ranks_text(ranks: list[int]) -> str:
    """'0-2,5': runs of three or more ranks as ranges."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and runs[-1][-1] == r - 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)) for run in runs)


UNPLANNED = -2**63
"""The digest a rank sends when its planner raised: its peers stop too, naming it, instead of waiting for it."""


def _holding(ranks: list[int], digest: int) -> str:
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranks_text(ranks)}"
    if digest == UNPLANNED:
        return f"{who} could not plan it (its own error says why)"
    return f"{who} {'has' if len(ranks) == 1 else 'have'} digest {digest & (2**64 - 1):016x}"


def plan_disagreement(digests: list[int], what: str) -> str | None:
    """None where every rank's plan digest (digests[rank]) is the same; otherwise why the job must stop, naming
    which ranks hold which digest, those of the first rank first."""
    holders: dict[int, list[int]] = {}
    for rank, digest in enumerate(digests):
        holders.setdefault(digest, []).append(rank)
    if len(holders) == 1:
        return None
    held = "; ".join(_holding(ranks, digest) for digest, ranks in holders.items())
    return (f"{what}: the adaptive SP plan differs between ranks: {held}. Every rank must plan with the same cost "
            "model (parallel.adaptive.cost_model: the same file on every node), token cap "
            "(parallel.adaptive.max_tokens_per_device) and documents (data, train.seed); stopped before any "
            "micro-batch, whose collectives the ranks would not join alike")


class PlanMismatchError(RuntimeError):
    """The ranks planned a step differently (plan_disagreement)."""


def gather_digests(digest: int, device: torch.device) -> list[int]:
    """Every rank's digest, in rank order: one all-gather of 8 bytes per rank. A collective."""
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return torch.cat(every).tolist()


@dataclass(frozen=True)
class PlannedStep:
    plan: DomainPlans
    digest: int
    """plan_digest of the step's sequences and plan."""
    planning_ms: float


def plan_step(ids: list[int], lengths: list[int], devices: int, cost: CostModel, max_degree: int | None,
              domains: int = 1) -> PlannedStep:
    """The plan of one step's sequences (lengths[i] is sequence ids[i]'s) on `domains` SP domains of `devices`
    each, with its digest: what the planning process runs."""
    started = time.perf_counter()
    plan = plan_domains(lengths, domains, devices, cost, max_degree)
    return PlannedStep(plan, plan_digest(ids, lengths, plan), (time.perf_counter() - started) * 1e3)


class PlanningProcess:
    """One spawned process that plans steps while this one trains, one request at a time. Spawned, not forked:
    a fork of a process that holds CUDA or gloo state is not safe. It starts at once and imports the trainers
    package (torch included, about 2 s) while the rank builds its model. It ends when this process ends, however
    that happens (os._exit, SIGKILL from Ray stopping a job): its end of the pipe then reads end-of-file."""

    def __init__(self):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), name="sp-planner", daemon=True)
        self._process.start()
        child.close()  # only the child holds its end: if the child dies, recv here reads end-of-file, no hang
        self.pending: int | None = None
        """The step whose plan was asked for and not yet read."""

    def submit(self, step: int, *args) -> None:
        """Plan `step`: plan_step(*args) in the planning process."""
        if self.pending is not None:
            self._answer()  # a plan nobody will read (the steps jumped): keep requests and answers paired
        try:
            self._conn.send(args)
        except (BrokenPipeError, ConnectionResetError):
            raise self._ended() from None
        self.pending = step

    def result(self) -> PlannedStep:
        """The pending plan, waiting for it; re-raises the planner's error."""
        ok, value = self._answer()
        if not ok:
            raise value
        return value

    def _answer(self) -> tuple[bool, PlannedStep | Exception]:
        self.pending = None
        try:
            return self._conn.recv()
        except (EOFError, ConnectionResetError):
            raise self._ended() from None

    def _ended(self) -> RuntimeError:
        self._process.join(timeout=5)
        return RuntimeError(f"the adaptive SP planning process (pid {self.pid}) ended with exit code "
                            f"{self._process.exitcode}; its traceback, if any, is in this rank's log above")

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        self._conn.close()
        self._process.join(timeout=5)


def _serve(conn) -> None:
    """The planning process: plan_step for every request until the rank's end of the pipe closes."""
    # Everything imported so far (torch, the trainers package) lives as long as the process: out of the cyclic
    # collector's sight, a full collection scans only what planning allocates. Measured at 1,024 devices and
    # 16,000 sequences: the slowest of 16 plans 261 ms -> 134 ms, the median 74 -> 72 ms (/tmp A/B, 2 cores).
    gc.freeze()
    try:
        while True:
            args = conn.recv()
            try:
                answer = (True, plan_step(*args))
            except Exception as err:  # the rank re-raises it (InfeasibleError names the sequence)
                answer = (False, err)
            conn.send(answer)
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the rank ended, mid-request or between them
        return


@dataclass
class MicroBatchWork:
    batch: Batch
    """This rank's slice of its group's packed sequences."""
    ranks: tuple[int, ...]
    """The group that computes it."""


@dataclass
class StepWork:
    micro_batches: list[MicroBatchWork]
    n_targets: int
    """Targets of the whole global batch (every rank knows every sequence: no reduction needed)."""
    n_tokens: int
    metrics: dict[str, float]
    """sp/micro_batches (the most any domain runs), sp/groups_degree_<d>, sp/idle_groups (groups left without a
    sequence, on padding) and sp/mixed_micro_batches (micro-batches whose groups are not all of one degree),
    summed over micro-batches and domains; sp/estimated_s (the slowest domain's), sp/domain_imbalance (the
    slowest domain's estimate over their mean, 1 with one domain), sp/planning_ms, sp/plan_check_ms (the
    digests' all-gather, the wait for the slowest rank included); and with the first step a process runs, the
    placement: sp/max_degree and sp/node_of_rank/<rank>."""


class AdaptiveSequenceParallel:
    """Turns global steps of whole documents into this rank's micro-batches, through the planner."""

    def __init__(self, sequences: DocumentSequences, batches: DocumentBatches, val: DocumentSequences, val_batches: int,
                 cost: CostModel, devices: int, rank: int, router: GroupRouter | None, max_degree: int | None = None,
                 node_of_rank: list[int] | None = None, device: torch.device | None = None, domains: int = 1):
        """`devices`: ranks of one SP domain; `domains`: how many (parallel.dp_replicate); `rank`: in the world."""
        self.sequences, self.batches, self.cost = sequences, batches, cost
        self.devices, self.domains, self.rank, self.router = devices, domains, rank, router
        self.max_degree = degrees_up_to(devices)[-1] if max_degree is None else max_degree
        self.node_of_rank = [0] * (devices * domains) if node_of_rank is None else node_of_rank
        self.device = torch.device("cpu") if device is None else device
        self._val, self._val_batches, self._val_work = val, val_batches, None
        self._planner = PlanningProcess()
        self._placement_reported = False

    def _inputs(self, ids: list[int]) -> tuple:
        return ids, self.sequences.lengths[ids].tolist(), self.devices, self.cost, self.max_degree, self.domains

    def _planned(self, step: int) -> tuple[list[int], PlannedStep]:
        ids = self.batches.sequences(step)
        planned = self._planner.result() if self._planner.pending == step else plan_step(*self._inputs(ids))
        self._planner.submit(step + 1, *self._inputs(self.batches.sequences(step + 1)))  # overlaps this step
        return ids, planned

    def _agree(self, digest: int, what: str) -> float:
        """Raise PlanMismatchError unless every rank holds this digest; the milliseconds the check took."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 0.0
        started = time.perf_counter()
        if problem := plan_disagreement(gather_digests(digest, self.device), what):
            raise PlanMismatchError(problem)
        return (time.perf_counter() - started) * 1e3

    def _told(self, plan, what: str):
        """plan(), or its error raised after telling the other ranks (UNPLANNED), who stop too instead of waiting
        in the comparison's all-gather for this rank."""
        try:
            return plan()
        except Exception:
            with contextlib.suppress(PlanMismatchError):
                self._agree(UNPLANNED, what)
            raise

    def step(self, step: int) -> StepWork:
        what = f"step {step + 1}"  # steps are reported 1-based
        ids, planned = self._told(lambda: self._planned(step), what)
        check_ms = self._agree(planned.digest, what)
        work = share_of(planned.plan, ids, self.sequences, self.rank, planned.planning_ms)
        work.metrics["sp/plan_check_ms"] = check_ms
        if not self._placement_reported:
            work.metrics |= self.placement_metrics()
            self._placement_reported = True
        return work

    def placement_metrics(self) -> dict[str, float]:
        """The group cap and each rank's node, as numbers a metrics store keeps."""
        return {"sp/max_degree": float(self.max_degree),
                **{f"sp/node_of_rank/{r}": float(n) for r, n in enumerate(self.node_of_rank)}}

    def route(self, micro: MicroBatchWork) -> None:
        """Attention of the next forward (and its backward) runs in `micro`'s group."""
        if self.router is not None:
            self.router.route(micro.ranks)

    def validation_micro_batches(self) -> list[MicroBatchWork]:
        """The validation split's first sequences in order, cut by the step budget: the same every time."""
        if self._val_work is None:
            ordered = DocumentBatches(self._val.lengths, self.batches.tokens_per_step, seed=0, shuffle=False)
            steps = [ordered.sequences(b) for b in range(min(self._val_batches, ordered.steps_in_epoch(0)))]
            what = "the validation batches"
            planned = self._told(lambda: [plan_step(ids, self._val.lengths[ids].tolist(), self.devices, self.cost,
                                                    self.max_degree, self.domains) for ids in steps], what)
            self._agree(_digest(tuple(p.digest for p in planned)), what)
            self._val_work = [micro for ids, p in zip(steps, planned)
                              for micro in share_of(p.plan, ids, self._val, self.rank, 0.0).micro_batches]
        return self._val_work

    def close(self) -> None:
        """End the planning process (it also ends on its own when this process exits)."""
        self._planner.close()


def share_of(plans: DomainPlans, ids: list[int], sequences: DocumentSequences, rank: int,
             planning_ms: float) -> StepWork:
    """Rank `rank`'s (in the world) share of a plan of the sequences `ids`: its domain's micro-batches (the
    domain's share indexes `ids`, its plan's sequence indices index the share), with the step's metrics."""
    domain, local_rank = divmod(rank, plans.devices)
    first = domain * plans.devices  # the domain's first rank in the world
    share = [ids[i] for i in plans.shares[domain]]
    micro_batches = []
    for micro in plans.plans[domain].micro_batches:
        group = next(g for g in micro.groups if local_rank in g.ranks)
        packed = sequences.packed([share[s] for s in group.sequences], pad_to_multiple=group.degree)
        local = shard_sequence(packed, local_rank - group.ranks[0], group.degree)
        micro_batches.append(MicroBatchWork(local, tuple(first + r for r in group.ranks)))
    tokens = int(sequences.lengths[ids].sum())
    return StepWork(micro_batches, n_targets=tokens, n_tokens=tokens, metrics=plan_metrics(plans, planning_ms))


def plan_metrics(plans: DomainPlans, planning_ms: float) -> dict[str, float]:
    """The StepWork.metrics a step's plan gives: all but sp/plan_check_ms and the placement's."""
    degrees, idle, mixed = Counter(), 0, 0
    for micro in (m for plan in plans.plans for m in plan.micro_batches):
        degrees.update(g.degree for g in micro.groups)
        idle += sum(not g.sequences for g in micro.groups)
        mixed += len({g.degree for g in micro.groups}) > 1
    metrics = {"sp/micro_batches": float(max(len(p.micro_batches) for p in plans.plans)),
               "sp/estimated_s": plans.estimated_s, "sp/domain_imbalance": plans.imbalance,
               "sp/planning_ms": planning_ms, "sp/idle_groups": float(idle), "sp/mixed_micro_batches": float(mixed)}
    return metrics | {f"sp/groups_degree_{d}": float(degrees.get(d, 0)) for d in degrees_up_to(plans.devices)}
