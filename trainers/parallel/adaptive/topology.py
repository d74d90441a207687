"""Which group degrees adaptive SP may use: what the attention can split and where the workers really are.

The planner lays power-of-two groups at consecutive offsets, largest first, so every group of degree d starts
at a multiple of d (an aligned block of ranks). Two things cap d below the SP domain:

- the attention: Ulysses gives each rank of a group whole query heads, so d must divide model.n_heads. Key and
  value heads need not divide: where d does not divide the kv heads, each rank gets copies of the kv heads its
  query heads read (trainers.parallel.sequence.ulysses), so more kv bytes cross the all-to-all, nothing else.
- the nodes: a group inside one node talks over its fast links; a group made of whole nodes is planned with the
  cost model's inter-node bandwidth for its degree; a group that holds part of a node and part of another fits
  neither, so it is never formed. `node_of_rank` is where Ray (or torchrun) really put each rank (NODE_RANK),
  not what a cost model assumes.

The cap is the largest power of two D such that every degree up to D is usable: the planner fills any
remainder of devices with smaller groups, so it needs every degree below the largest it uses.
"""

from __future__ import annotations

from trainers.parallel.adaptive.cost import degrees_up_to


def head_degree_cap(n_heads: int, devices: int) -> int:
    """The largest power of two that divides `n_heads` and is at most `devices`."""
    if n_heads < 1 or devices < 1:
        raise ValueError(f"n_heads = {n_heads}, devices = {devices}: both must be at least 1")
    return max(d for d in degrees_up_to(devices) if n_heads % d == 0)


def _block_fits_nodes(nodes: list[int], whole: dict[int, int]) -> bool:
    """A block of ranks (their nodes, in rank order) lies in one node, or is exactly some nodes' every rank."""
    present = set(nodes)
    return len(present) == 1 or all(nodes.count(n) == whole[n] for n in present)


def node_degree_cap(node_of_rank: list[int], domain: int | None = None) -> int:
    """The largest power of two D such that for every degree d <= D, each aligned block of d ranks lies within
    one node or is made of whole nodes. Ranks are numbered node by node (Ray Train, torchrun); a node's ranks
    that are not contiguous make every block holding some of them straddle. `domain`: the ranks are SP domains
    of this many consecutive ranks (parallel.dp_replicate > 1), blocks aligned within each and never wider;
    None: one domain of every rank."""
    devices = len(node_of_rank)
    if devices < 1:
        raise ValueError("node_of_rank is empty: no ranks")
    domain = devices if domain is None else domain
    whole = {n: node_of_rank.count(n) for n in set(node_of_rank)}  # a node's ranks in the world, not the domain
    cap = 1
    for d in degrees_up_to(domain)[1:]:
        blocks = [node_of_rank[start + first:start + first + d] for start in range(0, devices, domain)
                  for first in range(0, domain - d + 1, d)]
        if not all(_block_fits_nodes(block, whole) for block in blocks):
            break
        cap = d
    return cap


def max_group_degree(devices: int, n_heads: int, node_of_rank: list[int] | None = None) -> int:
    """The largest group degree adaptive SP may plan on an SP domain of `devices`: the attention's cap and, where
    the placement is known, the nodes' (`node_of_rank`: every rank of the world, whose consecutive runs of
    `devices` ranks are the domains)."""
    cap = head_degree_cap(n_heads, devices)
    return cap if node_of_rank is None else min(cap, node_degree_cap(node_of_rank, devices))


def describe_nodes(node_of_rank: list[int]) -> str:
    """'node 0: ranks 0-3, node 1: ranks 4-7', for messages and the run's tags."""
    spans: list[tuple[int, int, int]] = []
    for rank, node in enumerate(node_of_rank):
        if spans and spans[-1][0] == node and spans[-1][2] == rank - 1:
            spans[-1] = (node, spans[-1][1], rank)
        else:
            spans.append((node, rank, rank))
    return ", ".join(f"node {n}: ranks {a}" + (f"-{b}" if b > a else "") for n, a, b in spans)
