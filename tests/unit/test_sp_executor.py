"""The adaptive SP executor's pure parts: the aligned groups a cap leaves (and the router's refusal of any
other), the plan digest the ranks compare and the message when they differ, and a step's mixed-degree count;
and the process that plans ahead: its answers, its errors, and its end with the rank that started it."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest

from trainers.documents import DocumentSequences
from trainers.parallel.adaptive import InfeasibleError, load_cost_model, plan_adaptive
from trainers.parallel.adaptive.domains import DomainPlans
from trainers.parallel.adaptive.executor import (UNPLANNED, GroupRouter, PlanningProcess, aligned_groups,
                                                 plan_digest, plan_disagreement, plan_step, share_of)
from trainers.parallel.adaptive.planner import Group, MicroBatch, SPPlan
from trainers.parallel.mesh import number_nodes

FLEXSP = load_cost_model("flexsp-7b")


def test_aligned_groups_stop_at_the_cap():
    assert aligned_groups(8, 4) == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1, 2, 3), (4, 5, 6, 7)]
    assert aligned_groups(8, 1) == []
    assert aligned_groups(8, 8)[-1] == tuple(range(8))
    assert aligned_groups(6, 8) == [(0, 1), (2, 3), (4, 5), (0, 1, 2, 3)]  # 6 ranks: no group of 8, one of 4
    # 64 ranks of 8-device nodes: 56 process groups instead of 62 (32 + 16 + 8, not + 4 + 2 + 1)
    assert len(aligned_groups(64, 8)) == 56 and len(aligned_groups(64, 64)) == 63


def test_the_router_refuses_a_group_above_its_cap():
    router = GroupRouter(4, max_degree=1)  # no process group to create: no torch.distributed needed
    assert router.groups == {}
    router.route((2,))
    assert router.current is None
    with pytest.raises(ValueError, match=r"the plan puts ranks 0-1 in one SP group, but only aligned groups of "
                                         r"degree at most 1 exist on these 4 ranks .* plan with max_degree = 1"):
        router.route((0, 1))


def test_nodes_are_numbered_in_order_of_first_appearance():
    assert number_nodes([(1, "7"), (1, "7"), (0, "9"), (1, "8")]) == [0, 0, 1, 2]


def _plan() -> tuple[list[int], list[int], SPPlan]:
    lengths = np.random.default_rng(0).integers(500, 15_000, 60).tolist()  # every one fits a group of 4
    ids = list(range(100, 160))
    return ids, lengths, plan_adaptive(lengths, 16, FLEXSP)


def test_the_digest_covers_the_sequences_and_every_group_but_not_the_estimates():
    ids, lengths, plan = _plan()

    def plan_digest_of(ids, lengths, plan: SPPlan) -> int:  # one SP domain (more: tests/unit/test_sp_domains.py)
        return plan_digest(ids, lengths, DomainPlans.one(plan, len(lengths)))

    digest = plan_digest_of(ids, lengths, plan)
    assert plan_digest_of(list(ids), list(lengths), plan_adaptive(list(lengths), 16, FLEXSP)) == digest
    assert -2**63 <= digest < 2**63  # one int64 tensor element
    m, i = next((m, i) for m, micro in enumerate(plan.micro_batches) for i, g in enumerate(micro.groups)
                if len(g.sequences) >= 2)
    g = plan.micro_batches[m].groups[i]

    def with_group(group: Group) -> SPPlan:
        micro = plan.micro_batches[m]
        micro = replace(micro, groups=micro.groups[:i] + (group,) + micro.groups[i + 1:])
        return replace(plan, micro_batches=plan.micro_batches[:m] + (micro,) + plan.micro_batches[m + 1:])

    changed = [
        plan_digest_of(ids[:-1] + [999], lengths, plan),                              # another document
        plan_digest_of(ids, lengths[:-1] + [lengths[-1] + 1], plan),                  # another length
        plan_digest_of(ids, lengths, with_group(replace(g, sequences=g.sequences[1:]))),  # a sequence moved out
        plan_digest_of(ids, lengths, with_group(replace(g, sequences=g.sequences[::-1]))),  # packed in another order
        plan_digest_of(ids, lengths, replace(plan, micro_batches=plan.micro_batches[::-1])),  # micro-batches reordered
    ]
    assert digest not in changed and len(set(changed)) == len(changed)
    assert plan_digest_of(ids, lengths, with_group(replace(g, estimated_s=g.estimated_s * 2))) == digest
    assert plan_digest_of(ids, lengths, replace(plan, estimated_s=0.0, planning_ms=5.0)) == digest


def test_plan_step_plans_under_the_cap_and_digests_what_it_planned():
    ids, lengths, _ = _plan()
    planned = plan_step(ids, lengths, 16, FLEXSP, max_degree=4)
    assert max(g.degree for m in planned.plan.plans[0].micro_batches for g in m.groups) <= 4
    assert planned.digest == plan_digest(ids, lengths, planned.plan) and planned.planning_ms > 0


def test_agreeing_digests_say_nothing():
    assert plan_disagreement([5, 5, 5, 5], "step 3") is None
    assert plan_disagreement([-1], "step 3") is None


def test_disagreeing_digests_name_the_step_and_which_ranks_hold_what():
    a, b = 0x0123456789ABCDEF, -1
    message = plan_disagreement([a, a, b, a], "step 7")
    assert message.startswith("step 7: the adaptive SP plan differs between ranks: ranks 0,1,3 have digest "
                              "0123456789abcdef; rank 2 has digest ffffffffffffffff. Every rank must plan with the "
                              "same cost model (parallel.adaptive.cost_model: the same file on every node)")
    # a rank whose planner raised
    assert "ranks 0,1 have digest 0123456789abcdef; rank 2 could not plan it (its own error says why)." in \
        plan_disagreement([a, a, UNPLANNED], "step 7")
    # long runs of ranks as ranges; three digests
    message = plan_disagreement([a] * 6 + [b, a, 3], "the validation batches")
    assert "ranks 0-5,7 have digest 0123456789abcdef; rank 6 has digest ffffffffffffffff; rank 8 has digest " \
           "0000000000000003" in message


def _sequences(lengths: list[int]) -> DocumentSequences:
    """Documents of the given input lengths (+1 token each: the EOS, a target only) in one stream."""
    starts = np.cumsum([0] + [n + 1 for n in lengths[:-1]])
    return DocumentSequences(np.arange(sum(lengths) + len(lengths)) % 50, starts, max_len=1000)


def test_a_micro_batch_of_groups_of_two_degrees_counts_as_mixed():
    seqs = _sequences([8, 6, 4, 4, 3])
    mixed = MicroBatch((Group(2, (0, 1), (0,), 1.0), Group(1, (2,), (1,), 1.0), Group(1, (3,), (), 0.0)), 1.0)
    even = MicroBatch((Group(2, (0, 1), (2, 3), 1.0), Group(2, (2, 3), (4,), 1.0)), 1.0)
    work = share_of(DomainPlans.one(SPPlan(4, (mixed, even), 2.0), 5), [0, 1, 2, 3, 4], seqs, rank=3, planning_ms=1.0)
    assert work.metrics["sp/mixed_micro_batches"] == 1
    assert work.metrics["sp/idle_groups"] == 1
    assert [m.ranks for m in work.micro_batches] == [(3,), (2, 3)]
    assert work.micro_batches[0].batch.tokens.numel() == 0 + 1  # rank 3 idles on padding in the first
    assert work.micro_batches[1].batch.tokens.numel() == 2  # half of sequence 4 (3 tokens), padded to 4


def test_the_planning_process_answers_in_order_and_reraises_the_planners_error():
    planner = PlanningProcess()
    try:
        planner.submit(1, [0, 1], [100, 10**9], 8, FLEXSP, None)  # no group of 8 holds 10^9 tokens
        with pytest.raises(InfeasibleError, match="sequence 1 has 1000000000 tokens"):
            planner.result()
        planner.submit(2, [0, 1], [100, 2000], 8, FLEXSP, None)
        planner.submit(3, [0, 1], [100, 2000], 8, FLEXSP, 2)  # step 2's answer is read and dropped first
        assert planner.pending == 3
        planned = planner.result()
        assert planner.pending is None
        assert planned.plan.plans == (plan_adaptive([100, 2000], 8, FLEXSP, max_degree=2),)
    finally:
        planner.close()


def test_the_planning_process_ends_with_the_rank_however_it_ends():
    """os._exit skips every clean-up (as tests/distributed/spawn.py's ranks and a SIGKILLed Ray worker do)."""
    rank = subprocess.run([sys.executable, "-c", (
        "import os\n"
        "from trainers.parallel.adaptive import load_cost_model\n"
        "from trainers.parallel.adaptive.executor import PlanningProcess\n"
        "if __name__ == '__main__':\n"
        "    p = PlanningProcess()\n"
        "    p.submit(1, [0], [100], 8, load_cost_model('flexsp-7b'), None)\n"
        "    p.submit(2, [0], [100], 8, load_cost_model('flexsp-7b'), None)  # left unread\n"
        "    print(p.pid, flush=True)\n"
        "    os._exit(0)\n")], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert rank.returncode == 0, rank.stderr
    pid = int(rank.stdout)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the planning process {pid} outlived its rank by 30 s"
        time.sleep(0.2)
