"""EPLB placement (parallel/eplb.py): the deepseek-ai/EPLB README example, invariants on random loads, the
balance it buys on a skewed load, and argument checks."""

import pytest
import torch

from dsv3.parallel.eplb import balance_report, rebalance_experts


def check_placement(weight, num_replicas, num_gpus, phy2log, log2phy, logcnt):
    L, E = weight.shape
    assert phy2log.shape == (L, num_replicas) and logcnt.shape == (L, E)
    assert log2phy.shape == (L, E, int(logcnt.max()))
    assert (logcnt >= 1).all()  # every logical expert has a replica
    assert (logcnt.sum(-1) == num_replicas).all()
    for layer in range(L):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=E), logcnt[layer])
        for e in range(E):
            slots = log2phy[layer, e]
            real = slots[: logcnt[layer, e]]
            assert (slots[logcnt[layer, e]:] == -1).all()  # padding
            assert (phy2log[layer, real] == e).all()  # log2phy inverts phy2log
        # every physical slot is listed exactly once
        listed = log2phy[layer][log2phy[layer] >= 0]
        assert torch.equal(listed.sort().values, torch.arange(num_replicas))
    # GPU g holds slots [g * P/M, (g+1) * P/M): each of its num_replicas / num_gpus slots holds a real expert
    per_gpu = phy2log.view(L, num_gpus, num_replicas // num_gpus)
    assert ((per_gpu >= 0) & (per_gpu < E)).all()


def test_readme_example():
    # deepseek-ai/EPLB README: 2 layers of 12 experts in 4 groups, 16 replicas on 2 nodes x 4 GPUs
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                               [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy[0, 5].tolist() == [0, 2] and log2phy[0, 0].tolist() == [12, -1]
    check_placement(weight, 16, 8, phy2log, log2phy, logcnt)


CONFIGS = [  # (experts, replicas, groups, nodes, gpus)
    (12, 16, 4, 2, 8),  # hierarchical
    (16, 24, 4, 2, 4),
    (64, 80, 8, 4, 16),
    (64, 64, 8, 2, 8),  # no redundancy: placement only
    (256, 288, 8, 4, 32),  # V3's 256 experts, 8 groups, 32 redundant
    (12, 16, 3, 2, 4),  # groups not divisible by nodes: global
    (32, 40, 4, 1, 8),  # one node
    (8, 40, 2, 2, 4),  # many replicas per expert
]


@pytest.mark.parametrize("E,P,G,N,M", CONFIGS)
def test_invariants_on_random_loads(E, P, G, N, M):
    g = torch.Generator().manual_seed(E * 1000 + P)
    weight = torch.randint(0, 1000, (3, E), generator=g)
    weight[0, : E // 4] = 0  # idle experts still get a replica
    phy2log, log2phy, logcnt = rebalance_experts(weight, P, G, N, M)
    check_placement(weight, P, M, phy2log, log2phy, logcnt)

    if G % N == 0:  # hierarchical: each node holds whole groups, and only its own groups
        group = phy2log // (E // G)  # (L, P)
        for layer in range(3):
            node_groups = [set(group[layer, n * P // N:(n + 1) * P // N].tolist()) for n in range(N)]
            assert all(len(s) == G // N for s in node_groups)
            assert set().union(*node_groups) == set(range(G))
            for n, groups in enumerate(node_groups):
                on_node = set(phy2log[layer, n * P // N:(n + 1) * P // N].tolist())
                assert on_node == {e for e in range(E) if e // (E // G) in groups}


def test_all_zero_loads():
    phy2log, log2phy, logcnt = rebalance_experts(torch.zeros(2, 16), 24, 4, 2, 4)
    check_placement(torch.zeros(2, 16), 24, 4, phy2log, log2phy, logcnt)
    assert balance_report(torch.zeros(2, 16), phy2log, logcnt, 4).tolist() == [1.0, 1.0]


def test_global_policy_when_nodes_do_not_divide_groups():
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(4, 24, generator=g)
    for a, b in zip(rebalance_experts(weight, 32, 3, 2, 8), rebalance_experts(weight, 32, 1, 1, 8)):
        assert torch.equal(a, b)


def zipf_loads(layers, E, s, seed):
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([zipf[torch.randperm(E, generator=g)] for _ in range(layers)])


def test_redundant_experts_balance_a_skewed_load():
    E, M, L = 64, 8, 4
    weight = zipf_loads(L, E, 1.0, seed=0)
    # one replica per expert, placed as the model numbers them: the hottest expert alone is ~2 GPUs' mean
    static = balance_report(weight, torch.arange(E).expand(L, E), torch.ones(L, E, dtype=torch.long), M)
    assert (static > 1.9).all()
    # R = 0: packing alone cannot split the hottest expert
    phy2log, _, logcnt = rebalance_experts(weight, E, 1, 1, M)
    assert (balance_report(weight, phy2log, logcnt, M) > 1.8).all()
    # R = 8 (one more per GPU): the global policy brings every layer within 10% of the mean
    phy2log, _, logcnt = rebalance_experts(weight, E + 8, 1, 1, M)
    assert (balance_report(weight, phy2log, logcnt, M) <= 1.1).all()


def test_hierarchical_balances_gpus_within_each_node():
    # the hierarchical policy moves load between nodes only by whole groups, so its overall balance is
    # bounded by the group packing; inside a node the GPUs must still be balanced
    E, P, G, N, M, L = 64, 80, 8, 2, 8, 4
    weight = zipf_loads(L, E, 1.0, seed=0)
    phy2log, _, logcnt = rebalance_experts(weight, P, G, N, M)
    gpu_load = ((weight / logcnt).gather(1, phy2log)).view(L, N, M // N, -1).sum(-1)  # (L, N, GPUs per node)
    within = gpu_load.max(-1).values / gpu_load.mean(-1)
    assert (within <= 1.1).all()
    assert (balance_report(weight, phy2log, logcnt, M) <= 1.2).all()


def test_balance_report_by_hand():
    weight = torch.tensor([[6.0, 2.0, 2.0]])
    phy2log = torch.tensor([[0, 1, 0, 2]])  # GPU 0: expert 0 (half), expert 1; GPU 1: expert 0 (half), 2
    logcnt = torch.tensor([[2, 1, 1]])
    assert balance_report(weight, phy2log, logcnt, 2).tolist() == [1.0]
    assert balance_report(weight, torch.tensor([[0, 1, 2, 0]]), logcnt, 2).tolist() == [pytest.approx(5 / 5)]
    assert balance_report(weight, torch.tensor([[0, 0, 1, 2]]), logcnt, 2).tolist() == [pytest.approx(6 / 5)]


@pytest.mark.parametrize("args,match", [
    ((torch.ones(2, 12), 18, 4, 2, 8), "not a multiple of num_gpus"),
    ((torch.ones(2, 12), 16, 4, 3, 8), "not a multiple of num_nodes"),
    ((torch.ones(2, 12), 8, 4, 2, 8), "every expert needs a replica"),
    ((torch.ones(2, 12), 16, 5, 1, 8), "equal groups"),
    ((torch.ones(12), 16, 4, 2, 8), "layers, experts"),
    ((torch.ones(2, 12), 16, 0, 2, 8), "num_groups must be a positive int"),
    ((torch.ones(2, 12), 16.0, 4, 2, 8), "num_replicas must be a positive int"),
    ((-torch.ones(2, 12), 16, 4, 2, 8), "non-negative"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)
