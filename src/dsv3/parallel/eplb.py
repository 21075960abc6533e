"""Expert-parallel load balancing (EPLB): which experts to copy, and where to put every copy.

DeepSeek-V3 serves with *redundant experts* (arXiv 2412.19437, §3.4): heavily loaded experts get extra
replicas so that no GPU of an expert-parallel group carries much more than the mean. This is DeepSeek's
placement algorithm (github.com/deepseek-ai/EPLB), written out per layer; it takes and returns the same
things as that repo's `rebalance_experts`, and reproduces its README example exactly (tests/test_eplb.py).
Two greedy steps make it up:

- replicate: every expert starts with one replica; each extra replica goes to the expert whose load per
  replica is highest right now (a replica serves load / replicas of its expert);
- balanced packing: items, heaviest first, each go to the lightest pack that still has room, every pack
  taking the same number of items.

Hierarchical policy (num_groups % num_nodes == 0): pack whole expert groups onto nodes by their summed
load, so that group-limited routing (§2.1.2: a token visits at most `topk_group` groups) also limits the
nodes a token's all-to-all reaches; replicate the experts of each node inside that node; pack each node's
replicas onto its GPUs. Global policy (otherwise): the same with one node and no groups.

Physical experts are numbered node by node, GPU by GPU: GPU g holds physical experts
[g * P/num_gpus, (g+1) * P/num_gpus).

Legend: L layers, E logical experts, P physical experts (= num_replicas), K most replicas of one expert.
"""

from __future__ import annotations

import torch


def balanced_packing(load: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split n items (load: (n,)) into num_packs packs of n / num_packs items each, balancing the packs'
    loads. Returns (pack, slot): each item's pack and its position in that pack (order of arrival)."""
    n = load.numel()
    per_pack = n // num_packs
    if per_pack == 1:  # nothing to balance: keep every item where it is
        return torch.arange(n), torch.zeros(n, dtype=torch.int64)
    pack = torch.empty(n, dtype=torch.int64)
    slot = torch.empty(n, dtype=torch.int64)
    pack_load = [0.0] * num_packs
    pack_size = [0] * num_packs
    for item in torch.sort(load, descending=True, stable=True).indices.tolist():
        # the lightest pack with room; ties go to the lower pack index
        p = min((q for q in range(num_packs) if pack_size[q] < per_pack), key=lambda q: (pack_load[q], q))
        pack[item], slot[item] = p, pack_size[p]
        pack_load[p] += float(load[item])
        pack_size[p] += 1
    return pack, slot


def replicate(load: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn E experts (load: (E,)) into num_phy >= E replicas, minimising the largest load per replica.
    Returns (phy2log (num_phy,), rank (num_phy,): which replica of its expert each one is, count (E,)).
    Replicas 0..E-1 are the experts themselves; the extra ones follow in the order they were added."""
    num_log = load.numel()
    count = torch.ones(num_log, dtype=torch.int64)
    phy2log = list(range(num_log))
    rank = [0] * num_log
    for _ in range(num_phy - num_log):
        e = int(torch.argmax(load / count))  # first maximum on ties
        phy2log.append(e)
        rank.append(int(count[e]))
        count[e] += 1
    return torch.tensor(phy2log, dtype=torch.int64), torch.tensor(rank, dtype=torch.int64), count


def _place_layer(load_E: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                 num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer, hierarchical: (phy2log (P,), rank (P,)). The global policy is num_groups = num_nodes = 1."""
    E = load_E.numel()
    group_size = E // num_groups
    phy_per_node = num_replicas // num_nodes
    phy_per_gpu = num_replicas // num_gpus
    gpus_per_node = num_gpus // num_nodes

    # 1. whole groups onto nodes
    group_node, group_slot = balanced_packing(load_E.view(num_groups, group_size).sum(-1), num_nodes)

    phy2log = torch.empty(num_replicas, dtype=torch.int64)
    rank = torch.empty(num_replicas, dtype=torch.int64)
    for node in range(num_nodes):
        groups = sorted((g for g in range(num_groups) if group_node[g] == node), key=lambda g: group_slot[g])
        experts = torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in groups])
        # 2. replicate the node's experts within the node
        local_phy2log, local_rank, count = replicate(load_E[experts], phy_per_node)
        # 3. the node's replicas onto its GPUs, each replica carrying an even share of its expert's load
        replica_load = (load_E[experts] / count)[local_phy2log]
        gpu, slot = balanced_packing(replica_load, gpus_per_node)
        where = node * phy_per_node + gpu * phy_per_gpu + slot
        phy2log[where] = experts[local_phy2log]
        rank[where] = local_rank
    return phy2log, rank


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place num_replicas physical experts per layer on num_gpus GPUs (num_nodes nodes), given the
    expected load of each logical expert, weight (L, E) (e.g. a moving average of tokens routed).

    num_groups is the model's expert groups (`n_group`); the hierarchical policy is used when the nodes
    divide the groups, else the global one. Returns, all int64 on the CPU:
        phy2log (L, P): the logical expert held by each physical slot;
        log2phy (L, E, K): the physical slots of each logical expert, -1 past its count;
        logcnt  (L, E): how many replicas each logical expert has (>= 1, summing to P).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (layers, experts), got shape {tuple(weight.shape)}")
    L, E = weight.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} < {E} experts: every expert needs a replica")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    if E % num_groups:
        raise ValueError(f"{E} experts do not split into num_groups={num_groups} equal groups")
    weight = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError("weight must be finite and non-negative")

    if num_groups % num_nodes == 0:
        placed = [_place_layer(w, num_replicas, num_groups, num_nodes, num_gpus) for w in weight]
    else:
        placed = [_place_layer(w, num_replicas, 1, 1, num_gpus) for w in weight]
    phy2log = torch.stack([p for p, _ in placed])  # (L, P)
    rank = torch.stack([r for _, r in placed])  # (L, P)

    logcnt = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    K = int(logcnt.max())
    log2phy = torch.full((L, E, K), -1, dtype=torch.int64)
    layer = torch.arange(L).unsqueeze(1).expand(L, num_replicas)
    log2phy[layer, phy2log, rank] = torch.arange(num_replicas).expand(L, num_replicas)
    return phy2log, log2phy, logcnt


def balance_report(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor,
                   num_gpus: int) -> torch.Tensor:
    """Per layer, the max / mean of per-GPU load, a logical expert's load split evenly among its replicas
    (1.0 is perfect balance). With no redundancy, pass phy2log = arange(E) and logcnt = ones. Returns (L,)."""
    weight = weight.detach().to("cpu", torch.float64)
    replica_load = (weight / logcnt).gather(1, phy2log)  # (L, P)
    gpu_load = replica_load.view(weight.shape[0], num_gpus, -1).sum(-1)  # (L, num_gpus)
    mean = gpu_load.mean(-1)
    return torch.where(mean > 0, gpu_load.max(-1).values / mean.clamp_min(1e-30), torch.ones_like(mean))
