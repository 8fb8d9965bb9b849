"""The cost model against the closed α–β forms (docs/algorithms.md's cost table, the algorithm
modules' docstrings): where the form is exact for the schedule, the model must agree
to floating-point rounding (rel 1e-12), since both add the same terms."""
from __future__ import annotations

import math

import pytest

from fmcomm.algorithms import REGISTRY
from fmcomm.errors import InvalidArgument, TopologyError
from fmcomm.schedule import build
from fmcomm.topology import Figure, Kernels, Level, Topology
from fmcomm.tuning.cost import Pricer, algorithms, price, price_schedule, representatives, schedule_params

A_IN, B_IN = 2e-6, 1e10      # intra: α seconds, bandwidth bytes/s
A_EX, B_EX = 3e-5, 1e9       # inter
RED, CPY = 4e9, 8e9          # kernel rates, bytes/s
ITEM = 4


def fig(v):
    return Figure(v, "preset", "test")


def machine(nodes: int, per: int, node_in: float | None = None, node_ex: float | None = None) -> Topology:
    """Equal nodes; by default each node's links carry every rank's port at full speed."""
    return Topology.uniform(nodes, per, levels=(
        Level("intra", fig(A_IN), fig(B_IN), fig(node_in or per * B_IN)),
        Level("inter", fig(A_EX), fig(B_EX), fig(node_ex or per * B_EX))),
        kernels=Kernels(fig(RED), fig(CPY)))


def model(collective, algo, topo, nbytes):
    return price(collective, algo, topo, nbytes, ITEM).seconds


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-12)


@pytest.mark.parametrize("p", [2, 3, 4, 8, 16])
def test_ring_all_reduce_one_node(p):
    n = p * 1000 * ITEM
    expected = 2 * (p - 1) * A_IN + 2 * (p - 1) / p * n / B_IN + (p - 1) / p * n / RED
    assert close(model("all_reduce", "ring", machine(1, p), n), expected)


@pytest.mark.parametrize("p", [4, 8, 16])
def test_recursive_doubling_power_of_two(p):
    n = 4096 * ITEM
    lg = int(math.log2(p))
    expected = lg * A_IN + n * lg / B_IN + n * lg / RED
    assert close(model("all_reduce", "recursive_doubling", machine(1, p), n), expected)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_halving_doubling_power_of_two(p):
    n = p * 512 * ITEM
    lg = int(math.log2(p))
    expected = 2 * lg * A_IN + 2 * (p - 1) / p * n / B_IN + (p - 1) / p * n / RED
    assert close(model("all_reduce", "halving_doubling", machine(1, p), n), expected)


@pytest.mark.parametrize("p", [2, 5, 8])
def test_ring_reduce_scatter_and_all_gather(p):
    n = p * 300 * ITEM  # nccl-tests' size: the larger buffer
    rs = (p - 1) * A_IN + (p - 1) / p * n / B_IN + (p - 1) / p * n / RED
    assert close(model("reduce_scatter", "ring", machine(1, p), n), rs)
    # all-gather: its first round copies the rank's own block into place (no message)
    ag = (p - 1) * A_IN + (p - 1) / p * n / B_IN + n / p / CPY
    assert close(model("all_gather", "ring", machine(1, p), n), ag)


@pytest.mark.parametrize("nodes, per", [(2, 2), (4, 2), (3, 4), (8, 8)])
@pytest.mark.parametrize("shared", [False, True])
def test_hierarchical_all_reduce_with_and_without_a_shared_nic(nodes, per, shared):
    """docs/algorithms.md: 2(L-1)α_i + 2((L-1)/L)nβ_i + 2(N-1)α_e + 2((N-1)/N)(n/L)β_e + reductions.
    With one NIC per node (node bandwidth = one port's), the L lanes cross it together:
    the inter term's n/L becomes n."""
    n = nodes * per * 64 * ITEM
    L, N = per, nodes
    inter_bytes = 2 * (N - 1) / N * n * (1 if shared else 1 / L)
    expected = (2 * (L - 1) * A_IN + 2 * (L - 1) / L * n / B_IN + 2 * (N - 1) * A_EX + inter_bytes / B_EX
                + ((L - 1) / L * n + (N - 1) / (N * L) * n) / RED)
    topo = machine(nodes, per, node_ex=B_EX if shared else None)
    assert close(model("all_reduce", "hierarchical", topo, n), expected)


def test_a_flat_ring_over_two_nodes_is_paced_by_its_node_crossing_hops():
    # 2 x 2: in every round one message per node crosses nodes; 2(p-1) rounds of the
    # slower level (its α and n/p bytes at β_inter), reductions as ever.
    p, n = 4, 4 * 1000 * ITEM
    expected = 2 * (p - 1) * (A_EX + n / p / B_EX) + (p - 1) / p * n / RED
    assert close(model("all_reduce", "ring", machine(2, 2), n), expected)


def test_concurrent_flows_divide_a_node_link():
    # Scattered all-to-all on 2 nodes of 4: in its one round each node sends 4 x 4
    # blocks to the other node; with the node link at one port's speed they share it.
    n = 8 * 100 * ITEM  # a rank's whole buffer, one block per rank (nccl-tests' size)
    block = n / 8
    alone = model("all_to_all", "scattered", machine(2, 4), n)
    shared = model("all_to_all", "scattered", machine(2, 4, node_ex=B_EX), n)
    own = block / CPY  # each rank copies its own block into place
    assert close(alone, A_EX + 4 * block / B_EX + own)    # a port sends 4 blocks off the node
    assert close(shared, A_EX + 16 * block / B_EX + own)  # the node's 16 blocks share one port's bandwidth


def test_price_schedule_prices_the_object_the_executor_runs():
    topo = machine(2, 4)
    fn = REGISTRY[("all_reduce", "hierarchical")]
    sched = build("all_reduce", "hierarchical", fn, 8, 8000, 8000, count=8000, node_of=topo.node_of)
    assert close(price_schedule(sched, topo, ITEM), model("all_reduce", "hierarchical", topo, 8000 * ITEM))
    with pytest.raises(InvalidArgument, match="8 ranks, topology of 4"):
        price_schedule(sched, machine(1, 4), ITEM)


CASES = [(c, a) for (c, a) in sorted(REGISTRY)]


@pytest.mark.parametrize("collective, algo", CASES)
@pytest.mark.parametrize("nodes, per", [(4, 4), (5, 3)])
def test_fewer_ranks_built_gives_the_full_price(collective, algo, nodes, per):
    """Derived by symmetry or one node for all: the price every rank's steps give,
    for every registered schedule (sizes divisible, so derived sizes are exact)."""
    topo = machine(nodes, per)
    p = topo.world
    nbytes = p * p * 16 * ITEM
    params = schedule_params(collective, p, nbytes, ITEM)
    fn = REGISTRY[(collective, algo)]
    counts = {"all_reduce": (params.get("count"),) * 2, "reduce_scatter": (p * params.get("count", 0), params.get("count")),
              "all_gather": (params.get("count"), p * params.get("count", 0)), "broadcast": (params.get("count"),) * 2,
              "reduce": (params.get("count"),) * 2, "barrier": (0, 0), "all_to_all": (nbytes // ITEM,) * 2}[collective]
    kw = dict(params)
    if algo == "hierarchical":
        kw["node_of"] = topo.node_of
    full = price_schedule(build(collective, algo, fn, p, *counts, **kw), topo, ITEM)
    # limit 0 and no budget: the node-sampling path wherever no symmetry holds
    for limit, budget in ((0, 0.0), (0, 10.0), (10_000, 0.0)):
        reps = representatives(collective, algo, topo, params, full_limit=limit, full_budget_s=budget)
        got = price(collective, algo, topo, nbytes, ITEM, full_limit=limit, full_budget_s=budget).seconds
        if reps.exact:
            assert close(got, full), (reps.method, got, full)
        else:
            assert got <= full * (1 + 1e-12) and reps.method.startswith("estimate")


def test_ring_and_hierarchical_build_one_rank_and_derive_the_rest():
    topo = machine(64, 8)
    for algo, how in (("ring", "shift"), ("hierarchical", "rotating")):
        reps = representatives("all_reduce", algo, topo, {"count": 1 << 20})
        assert how in reps.method and reps.exact and reps.light.ranks.tolist() == list(range(8))


def test_sizes_scale_from_one_profile_once_they_grow_in_proportion():
    topo = machine(4, 4)
    sizes = [1 << k for k in range(6, 25)]
    for algo in algorithms("all_reduce"):
        pricer = Pricer("all_reduce", algo, topo, ITEM)
        for s, est in zip(sizes, pricer.price_all(sizes)):
            exact = model("all_reduce", algo, topo, s)
            # scaled sizes differ from built ones only by the split's rounding
            assert math.isclose(est.seconds, exact, rel_tol=2e-3), (algo, s, est.seconds, exact)
        assert pricer.built < len(sizes), algo


def test_missing_figures_are_named():
    with pytest.raises(TopologyError, match="no figures for the inter level"):
        price("all_reduce", "ring", Topology.uniform(2, 2, levels=machine(1, 2).levels[:1],
                                                      kernels=machine(1, 2).kernels), 4096)
    with pytest.raises(TopologyError, match="no kernel rates"):
        price("all_reduce", "ring", Topology.uniform(1, 2, levels=machine(1, 2).levels), 4096)
    with pytest.raises(InvalidArgument, match="no schedule 'bogus'"):
        price("all_reduce", "bogus", machine(1, 2), 4096)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_rooted_and_barrier_forms(p):
    """docs/algorithms.md: broadcast binomial ⌈lg p⌉(α + nβ) (plus the root's copy into its output, a
    round of its own); reduce binomial ⌈lg p⌉(α + nβ + nγ); barrier dissemination ⌈lg p⌉α
    (each message one element of scratch)."""
    lg = math.ceil(math.log2(p))
    n = 1000 * ITEM
    assert close(model("broadcast", "binomial", machine(1, p), n), lg * (A_IN + n / B_IN) + n / CPY)
    assert close(model("reduce", "binomial", machine(1, p), n), lg * (A_IN + n / B_IN + n / RED))
    assert close(model("barrier", "dissemination", machine(1, p), 0), lg * (A_IN + ITEM / B_IN))


@pytest.mark.parametrize("p", [3, 5, 8])
def test_chain_broadcast_form(p):
    """docs/algorithms.md: (C + p − 2)(α + (n/C)β), C the pipeline's piece count."""
    from fmcomm.algorithms.broadcast import default_chunks
    count = 60 << 12  # divisible by the piece count chosen at p = 3, 5, 8 (2, 3, 5)
    c = default_chunks(p, count)
    n = count * ITEM
    assert count % c == 0
    assert close(model("broadcast", "chain", machine(1, p), n), (c + p - 2) * (A_IN + n / c / B_IN) + n / CPY)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_recursive_doubling_all_gather_form(p):
    """docs/algorithms.md: ⌈lg p⌉α + ((p−1)/p)nβ, plus the first round's copy of the rank's own block."""
    n = p * 512 * ITEM
    lg = int(math.log2(p))
    # round k moves 2^k blocks of n/p: the β term sums to (p-1)/p · n
    assert close(model("all_gather", "recursive_doubling", machine(1, p), n),
                 lg * A_IN + (p - 1) / p * n / B_IN + n / p / CPY)
