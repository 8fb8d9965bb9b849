"""The cost model: the time a schedule takes on a topology, priced round by round.

It reads the very :class:`~fmcomm.schedule.Schedule` the executor runs; there is no
formula per algorithm, so a new algorithm file is priced as soon as it is registered.

**The model.** Rounds run one after another (a rank starts round r+1 when its round r
is done; the slowest rank sets the pace). Inside a round every message is in flight at
once, and each crosses the resources of the level it travels on (``intra`` between
ranks of one node, ``inter`` between nodes):

- its sender's port out and its receiver's port in, each of ``level.bandwidth``;
- its sender's node's way out and its receiver's node's way in, each of
  ``level.node_bandwidth`` (a node's NICs for ``inter``; its memory or switch for
  ``intra``).

A resource carrying B bytes in a round is busy B / capacity (concurrent flows divide
its bandwidth), and a message is done when the busiest resource on its path is, plus
the level's α. So a round takes the largest α + load / capacity over its resources,
then the round's local work: per rank, bytes reduced / ``kernels.reduce`` plus bytes
copied / ``kernels.copy``, the slowest rank's. On one level with idle node links this
is the α–β model exactly: ring all-reduce prices to 2(p-1)α + 2((p-1)/p)nβ +
((p-1)/p)nγ.

**Pricing thousands of ranks without every rank's steps.** Which ranks' steps are
built (see :func:`representatives`):

1. *Derived by symmetry.* If the schedule is invariant under a relabelling σ of the
   ranks — ``shift`` (r -> r+1 mod p: ring, dissemination, pairwise) or ``rotate``
   (r -> the next local rank of its node, and r -> the same local rank of the next
   node: hierarchical) — only rank 0's steps are built, and those of the other ranks
   of node 0 are derived by mapping rank 0's peers through σ. The symmetry is checked,
   not assumed: the ranks σ(0), the last rank and (for ``rotate``) the first rank of
   node 1 are built and must equal their derived steps (the same peers; message sizes
   within one element, the rounding of ``chunk_bounds``). With the symmetry every node
   is alike, so node 0's resources stand for all.
2. *One node for all.* Else, beyond ``full_limit`` ranks, if nodes 0, 1 and the last
   are alike (the same loads on their ports and links in every round), node 0's ranks
   are built and stand for all.
3. *Every rank*, up to ``full_limit`` ranks or where the quickest single build so far,
   p times, is within ``full_budget_s``; beyond that the largest of the sampled nodes 0, 1, N/2 and
   N-1, an estimate that says so.

**Many sizes from few builds.** Message sizes grow in proportion to the count once
every part of the split holds at least one element and the algorithm's
size-dependent parameters (pipeline chunks) have stopped changing. :class:`Pricer`
builds the largest size first (checking the symmetry in full there; at other sizes it
is checked on rank 1 and, for ``rotate``, the first rank of node 1), bisects for the
smallest size whose profile is the largest one scaled, and prices every size from
there up by scaling. Smaller sizes are built one by one; where counts are too small
for every rank to hold a part and the symmetry breaks, they are scaled down from the
smallest symmetric profile instead, an estimate that says so.
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import time
from typing import Callable, Optional, Sequence

import numpy as np

from ..algorithms import REGISTRY
from ..errors import InvalidArgument, TopologyError
from ..schedule import Copy, RankSchedule, Recv, Reduce, Schedule, Send
from ..topology.model import Topology

# ------------------------------------------------------------ collectives

#: nccl-tests' bus-bandwidth factors (doc/PERFORMANCE.md): busbw = algbw x factor.
BUSBW_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
    "all_to_all": lambda p: (p - 1) / p,
    "broadcast": lambda p: 1.0,
    "reduce": lambda p: 1.0,
    "barrier": lambda p: 0.0,
}


def algorithms(collective: str) -> list[str]:
    """The registered schedules of ``collective`` (every one the cost model can price)."""
    found = sorted(a for (c, a) in REGISTRY if c == collective)
    if not found:
        raise InvalidArgument(f"no schedules for collective {collective!r}; "
                              f"collectives are {', '.join(sorted({c for c, _ in REGISTRY}))}")
    return found


def schedule_params(collective: str, world: int, nbytes: int, itemsize: int, root: int = 0) -> dict:
    """The schedule function's parameters for a message of ``nbytes`` (nccl-tests' sizes:
    the larger buffer for all_gather and reduce_scatter, the whole buffer for all_to_all)."""
    count = nbytes // itemsize
    if collective == "all_reduce":
        return {"count": count}
    if collective in ("reduce_scatter", "all_gather"):
        return {"count": count // world}
    if collective in ("broadcast", "reduce"):
        return {"count": count, "root": root}
    if collective == "all_to_all":
        row = (count // world,) * world  # each rank's buffer holds one block per peer
        return {"counts": (row,) * world}
    if collective == "barrier":
        return {}
    raise InvalidArgument(f"the cost model knows no collective {collective!r}")


def _call(collective: str, algo: str, rank: int, world: int, params: dict, topo: Topology) -> RankSchedule:
    fn = REGISTRY.get((collective, algo))
    if fn is None:
        raise InvalidArgument(f"no schedule {algo!r} for {collective}; choose from {', '.join(algorithms(collective))}")
    kw = dict(params)
    if "node_of" in inspect.signature(fn).parameters:
        kw["node_of"] = topo.node_of  # topology-aware schedules, as the communicator passes it
    return fn(rank, world, **kw)


# ------------------------------------------------------------ light schedules

@dataclasses.dataclass(frozen=True)
class Light:
    """Ranks' schedules reduced to what costs time, as flat arrays.

    Messages: ``m_round``, ``m_rank``, ``m_peer``, ``m_count`` (elements), ``m_recv``
    (0 a send, 1 a receive). Local work: ``w_round``, ``w_rank``, ``w_reduced``,
    ``w_copied`` (elements)."""
    m_round: np.ndarray
    m_rank: np.ndarray
    m_peer: np.ndarray
    m_count: np.ndarray
    m_recv: np.ndarray
    w_round: np.ndarray
    w_rank: np.ndarray
    w_reduced: np.ndarray
    w_copied: np.ndarray
    rounds: int

    @property
    def ranks(self) -> np.ndarray:
        return np.unique(np.concatenate([self.m_rank, self.w_rank]))


def _ints(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def lighten(rs: RankSchedule) -> Light:
    msg: list[tuple[int, int, int, int]] = []
    work: list[tuple[int, int, int]] = []
    for ri, rnd in enumerate(rs.rounds):
        red = cp = 0
        for st in rnd:
            if isinstance(st, Send):
                msg.append((ri, st.peer, st.src.count, 0))
            elif isinstance(st, Recv):
                msg.append((ri, st.peer, st.dst.count, 1))
            elif isinstance(st, Reduce):
                red += st.dst.count
            elif isinstance(st, Copy):
                cp += st.dst.count
        if red or cp:
            work.append((ri, red, cp))
    m = _ints(msg).reshape(-1, 4)
    w = _ints(work).reshape(-1, 3)
    return Light(m[:, 0], np.full(len(m), rs.rank, dtype=np.int64), m[:, 1], m[:, 2], m[:, 3],
                 w[:, 0], np.full(len(w), rs.rank, dtype=np.int64), w[:, 1], w[:, 2], len(rs.rounds))


def join(lights: Sequence[Light]) -> Light:
    cat = lambda name: np.concatenate([getattr(x, name) for x in lights])  # noqa: E731
    return Light(*(cat(f.name) for f in dataclasses.fields(Light) if f.name != "rounds"),
                 rounds=max((x.rounds for x in lights), default=0))


def relabel(light: Light, rank: int, sigma: Callable) -> Light:
    """One rank's ``light`` as rank ``rank`` = σ(its rank) takes it: every peer mapped by σ
    (σ is arithmetic on rank numbers, so it maps whole arrays)."""
    return dataclasses.replace(light, m_rank=np.full_like(light.m_rank, rank), m_peer=sigma(light.m_peer),
                               w_rank=np.full_like(light.w_rank, rank))


def _same(a: Light, b: Light) -> bool:
    """Equal messages (round, direction, peer), sizes within one element; local work
    within the rounding of the sizes it follows."""
    if a.rounds != b.rounds or len(a.m_round) != len(b.m_round) or not np.array_equal(a.w_round, b.w_round):
        return False
    ka = np.lexsort((a.m_count, a.m_peer, a.m_recv, a.m_round))
    kb = np.lexsort((b.m_count, b.m_peer, b.m_recv, b.m_round))
    for f in ("m_round", "m_recv", "m_peer"):
        if not np.array_equal(getattr(a, f)[ka], getattr(b, f)[kb]):
            return False
    if np.any(np.abs(a.m_count[ka] - b.m_count[kb]) > 1):
        return False
    slack = np.bincount(a.m_round, minlength=a.rounds)[a.w_round] + 1 if len(a.w_round) else 0
    return bool(np.all(np.abs(a.w_reduced - b.w_reduced) <= slack) and np.all(np.abs(a.w_copied - b.w_copied) <= slack))


# ------------------------------------------------------------ which ranks to build

@dataclasses.dataclass(frozen=True)
class Representatives:
    light: Light   # the steps of every rank of the nodes that stand for all
    method: str    # how they were chosen, for people
    exact: bool    # False: a sample of nodes, the largest taken (an estimate)
    symmetry: str = ""  # "shift" or "rotate" where the others were derived by it


def _uniform(topo: Topology) -> Optional[int]:
    sizes = {len(g) for g in topo.groups()}
    if len(sizes) != 1:
        return None
    per = sizes.pop()
    return per if topo.node_of == tuple(r // per for r in range(topo.world)) else None


def representatives(collective: str, algo: str, topo: Topology, params: dict,
                    full_limit: int = 256, trusted: str = "", full_budget_s: float = 1.0) -> Optional[Representatives]:
    """The ranks whose steps price the schedule (see the module docstring).

    ``trusted``: a symmetry ("shift", "rotate") this schedule was found to have at
    another size of the same sweep; it is checked on fewer ranks (rank 1, and the first
    rank of node 1 for ``rotate``) - still checked, since at counts below the number
    of parts some ranks get empty chunks and the symmetry breaks. Where a trusted
    symmetry does not hold and every rank would have to be built, None: the caller
    prices that size another way (:class:`Pricer` scales the symmetric profile down)."""
    p = topo.world
    cache: dict[int, Light] = {}

    durations: list[float] = []

    def built(r: int) -> Light:
        if r not in cache:
            started = time.perf_counter()
            cache[r] = lighten(_call(collective, algo, r, p, params, topo))
            durations.append(time.perf_counter() - started)
        return cache[r]

    def affordable() -> bool:
        # Every rank, where the quickest build so far (the first may fill caches), p times, fits the budget.
        return p <= full_limit or min(durations) * p <= full_budget_s

    def every_rank() -> Representatives:
        return Representatives(join([built(r) for r in range(p)]), "every rank built", True)

    was_enabled = gc.isenabled()
    gc.disable()  # schedules are many small objects; collection passes over them dominate otherwise
    try:
        per = _uniform(topo)
        nodes = topo.nodes
        if p <= 2 or per is None:
            return every_rank()
        first = built(0)

        def shift(k: int) -> Callable:
            return lambda q: (q + k) % p

        def rotate(k: int) -> Callable:
            return lambda q: (q // per) * per + (q % per + k) % per

        def node_shift(k: int) -> Callable:
            return lambda q: (q + k * per) % p
        # 1. derived by symmetry (a symmetry found at another size is checked on one rank only)
        if all(_same(built(r), relabel(first, r, shift(r))) for r in ((1,) if trusted == "shift" else (1, p - 1))):
            light = join([relabel(first, r, shift(r)) for r in range(per)])
            return Representatives(light, "rank 0 built, the others derived by the shift r -> r+1", True, "shift")
        checks = [(r, rotate(r)) for r in (1, per - 1) if 0 < r < per]
        if nodes > 1:
            checks += [(per, node_shift(1)), (p - per, node_shift(nodes - 1))]
        if trusted == "rotate":
            checks = checks[:1] + [c for c in checks if c[0] == per]
        if trusted != "shift" and checks and all(_same(built(r), relabel(first, r, sig)) for r, sig in checks):
            light = join([relabel(first, r, rotate(r)) for r in range(per)])
            return Representatives(light, "rank 0 built, the others derived by rotating local ranks and nodes",
                                   True, "rotate")
        if trusted and not affordable():
            return None
        # 2. one node for all
        if nodes >= 3 and p > full_limit:
            sample = sorted({0, 1, nodes // 2, nodes - 1})
            groups = {n: join([built(n * per + i) for i in range(per)]) for n in sample}
            sig = {n: _resource_loads(groups[n], topo, relative=True) for n in sample}
            if all(_equal_loads(sig[0], sig[n]) for n in (1, nodes - 1)):
                return Representatives(groups[0], "node 0 built: nodes 0, 1 and the last carry equal loads", True)
            if affordable():
                return every_rank()
            return Representatives(join(list(groups.values())),
                                   f"estimate: the busiest of nodes {', '.join(map(str, sample))} of {nodes} "
                                   f"(nodes differ, and every rank would take too long)", False)
        # 3. every rank
        return every_rank()
    finally:
        if was_enabled:
            gc.enable()


# ------------------------------------------------------------ profile and price

_PORT_OUT, _PORT_IN, _NODE_OUT, _NODE_IN = range(4)


def _resource_loads(light: Light, topo: Topology, relative: bool = False):
    """Per (round, resource): elements carried. Resources are (kind, id, level), kind a
    port or a node link, out or in; level 0 intra, 1 inter. ``relative``: ids counted
    from the lowest rank/node present (to compare nodes with each other)."""
    node_of = np.asarray(topo.node_of, dtype=np.int64)
    me_node, peer_node = node_of[light.m_rank], node_of[light.m_peer]
    level = (me_node != peer_node).astype(np.int64)
    rank_id, node_id = light.m_rank, me_node
    if relative and len(rank_id):
        rank_id, node_id = rank_id - rank_id.min(), node_id - node_id.min()
    span = max(topo.world, 1)
    keys = np.concatenate([
        ((light.m_round * 4 + light.m_recv) * span + rank_id) * 2 + level,                 # ports: out 0, in 1
        ((light.m_round * 4 + 2 + light.m_recv) * span + node_id) * 2 + level])            # node links: out 2, in 3
    counts = np.concatenate([light.m_count, light.m_count]).astype(np.float64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq))


def _equal_loads(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1], rtol=0, atol=1)


@dataclasses.dataclass(frozen=True)
class Profile:
    """A schedule's work per round in elements, ready to price at any element size.

    Flat arrays, one entry per loaded resource in a round: ``round_of``, ``alpha``
    (seconds), ``load`` (elements), ``inv_capacity`` (seconds per byte). ``work``: per
    round, the slowest rank's reduce-and-copy seconds per byte of element size."""
    rounds: int
    round_of: np.ndarray
    alpha: np.ndarray
    load: np.ndarray
    inv_capacity: np.ndarray
    work: np.ndarray
    method: str
    exact: bool

    def seconds(self, itemsize: int, scale: float = 1.0) -> float:
        """Predicted time with elements of ``itemsize`` bytes, every load multiplied by ``scale``."""
        per_round = np.zeros(self.rounds)
        if self.round_of.size:
            t = self.alpha + self.load * (scale * itemsize) * self.inv_capacity
            np.maximum.at(per_round, self.round_of, t)
        return float(per_round.sum() + self.work.sum() * scale * itemsize)

    def scaled_equal(self, other: "Profile", factor: float, rtol: float) -> bool:
        """Whether ``other`` is this profile with every load and work times ``factor``."""
        return (self.rounds == other.rounds and np.array_equal(self.round_of, other.round_of)
                and np.allclose(self.load * factor, other.load, rtol=rtol, atol=0)
                and np.allclose(self.work * factor, other.work, rtol=rtol, atol=1e-30))


def profile(reps: Representatives, topo: Topology) -> Profile:
    light = reps.light
    keys, loads = _resource_loads(light, topo)
    level = keys % 2
    kind = (keys // 2 // max(topo.world, 1)) % 4
    round_of = keys // 2 // max(topo.world, 1) // 4
    alpha = np.zeros(len(keys))
    inv = np.zeros(len(keys))
    for code, name in enumerate(("intra", "inter")):
        here = level == code
        if not here.any():
            continue
        lv = topo.level(name)  # TopologyError names a level without figures
        alpha[here] = lv.alpha.value
        port = here & (kind < 2)
        inv[port] = 1.0 / lv.bandwidth.value
        inv[here & ~port] = 1.0 / lv.node_bandwidth.value
    work = np.zeros(light.rounds)
    if len(light.w_round):
        if topo.kernels is None:
            raise TopologyError(f"topology {topo.name or '(detected)'} has no kernel rates (reduce, copy); "
                                f"run fmcomm topo --probe or load a machine file that has them")
        per_rank = light.w_reduced / topo.kernels.reduce.value + light.w_copied / topo.kernels.copy.value
        np.maximum.at(work, light.w_round, per_rank)
    return Profile(light.rounds, round_of, alpha, loads, inv, work, reps.method, reps.exact)


@dataclasses.dataclass(frozen=True)
class Estimate:
    collective: str
    algo: str
    nbytes: int
    seconds: float
    busbw: float    # bytes/s, nccl-tests' definition
    method: str
    exact: bool


def price_schedule(sched: Schedule, topo: Topology, itemsize: int) -> float:
    """Seconds for a whole :class:`Schedule` (every rank given) on ``topo``."""
    if sched.world != topo.world:
        raise InvalidArgument(f"schedule for {sched.world} ranks, topology of {topo.world}")
    reps = Representatives(join([lighten(rs) for rs in sched.ranks]), "every rank given", True)
    return profile(reps, topo).seconds(itemsize)


def price(collective: str, algo: str, topo: Topology, nbytes: int, itemsize: int = 4, root: int = 0,
          full_limit: int = 256, full_budget_s: float = 1.0) -> Estimate:
    """Predicted time of one collective of ``nbytes`` with schedule ``algo`` on ``topo``."""
    params = schedule_params(collective, topo.world, nbytes, itemsize, root)
    reps = representatives(collective, algo, topo, params, full_limit, full_budget_s=full_budget_s)
    seconds = profile(reps, topo).seconds(itemsize)
    return _estimate(collective, algo, topo.world, nbytes, seconds, reps.method, reps.exact)


def _estimate(collective, algo, world, nbytes, seconds, method, exact) -> Estimate:
    busbw = nbytes / seconds * BUSBW_FACTOR[collective](world) if seconds > 0 else 0.0
    return Estimate(collective, algo, nbytes, seconds, busbw, method, exact)


_SIZE_BUDGET_S = 0.6  # building every rank at one size of a sweep, at most (estimated from one rank's build)


class Pricer:
    """Prices one algorithm over a sweep of sizes, building as few profiles as it can.

    1. The profile at the largest size is built (symmetry checked in full).
    2. Proportional growth: the smallest size whose profile equals the largest one's
       after scaling (every load and all local work in proportion to the count,
       within ``rtol``: the split's rounding) is found by bisection over the sizes;
       every size from there up is priced from the largest profile, scaled. This
       assumes that what a schedule's structure depends on changes monotonically with
       the size (as the pipeline chunks of ``tree`` and ``chain`` do), so the same
       structure at two sizes means the same in between.
    3. Smaller sizes are built one by one, largest first. Where a symmetric schedule
       stops being symmetric (counts below the number of parts leave some ranks empty
       chunks) and every rank would have to be built, that size and all below it are
       priced from the smallest symmetric profile scaled down - an estimate, marked so:
       the empty messages the real schedule drops are priced as tiny ones, so each
       round keeps its α.

    Building every rank of a schedule without symmetry is allowed while it fits
    ``full_budget_s`` seconds for the whole sweep (and ``_SIZE_BUDGET_S`` per size), so a
    sweep of thousands of ranks stays within seconds; past it such sizes are sampled
    estimates, marked so.
    """

    def __init__(self, collective: str, algo: str, topo: Topology, itemsize: int = 4, root: int = 0,
                 full_limit: int = 256, rtol: float = 2e-3, full_budget_s: float = 1.0):
        self.collective, self.algo, self.topo = collective, algo, topo
        self.itemsize, self.root, self.full_limit, self.rtol = itemsize, root, full_limit, rtol
        self._symmetry = ""
        self._budget_left = full_budget_s
        self.built = 0

    def _params(self, nbytes: int) -> dict:
        return schedule_params(self.collective, self.topo.world, nbytes, self.itemsize, self.root)

    def _count(self, nbytes: int) -> int:
        params = self._params(nbytes)
        return params["counts"][0][0] if "counts" in params else params.get("count", 0)

    def _build(self, nbytes: int) -> Optional[Profile]:
        self.built += 1
        started = time.perf_counter()
        reps = representatives(self.collective, self.algo, self.topo, self._params(nbytes), self.full_limit,
                               self._symmetry, full_budget_s=min(_SIZE_BUDGET_S, self._budget_left))
        if reps is not None and reps.method == "every rank built" and self.topo.world > self.full_limit:
            self._budget_left -= time.perf_counter() - started
        if reps is None:
            return None
        self._symmetry = self._symmetry or reps.symmetry
        return profile(reps, self.topo)

    def _estimate(self, nbytes: int, seconds: float, method: str, exact: bool) -> Estimate:
        return _estimate(self.collective, self.algo, self.topo.world, nbytes, seconds, method, exact)

    def price(self, nbytes: int) -> Estimate:
        """One size, built at that size."""
        reps = representatives(self.collective, self.algo, self.topo, self._params(nbytes), self.full_limit)
        return self._estimate(nbytes, profile(reps, self.topo).seconds(self.itemsize), reps.method, reps.exact)

    def price_all(self, byte_sizes: Sequence[int]) -> list[Estimate]:
        """Every size of the sweep, in the order given."""
        order = sorted(set(byte_sizes))
        largest = order[-1]
        top = self._build(largest)
        top_count = self._count(largest)
        out: dict[int, Estimate] = {largest: self._estimate(largest, top.seconds(self.itemsize), top.method, top.exact)}
        built: dict[int, Optional[Profile]] = {largest: top}

        def linear(i: int) -> bool:
            size = order[i]
            if size not in built:
                built[size] = self._build(size)
            prof, count = built[size], self._count(size)
            return prof is not None and 0 < count and prof.scaled_equal(top, top_count / count, self.rtol)
        lo, hi = 0, len(order) - 1  # the first linear index is in [lo, hi]; order[-1] is linear by definition
        while lo < hi:
            mid = (lo + hi) // 2
            if linear(mid):
                hi = mid
            else:
                lo = mid + 1
        for size in order[lo:-1]:
            out[size] = self._estimate(size, top.seconds(self.itemsize, self._count(size) / top_count),
                                       top.method + f"; scaled from the profile at {top_count} elements", top.exact)
        floor: tuple[int, Profile] = (top_count, top)  # the smallest symmetric profile so far
        broken = False
        for size in reversed(order[:lo]):
            prof = None if broken else (built[size] if size in built else self._build(size))
            if prof is None:
                broken = True
                base, ref = floor
                out[size] = self._estimate(size, ref.seconds(self.itemsize, self._count(size) / base),
                                           f"estimate: too few elements for every rank to hold a part, so the "
                                           f"symmetry breaks; scaled down from the profile at {base} elements", False)
                continue
            if prof.method.startswith("rank 0 built"):
                floor = (self._count(size), prof)
            out[size] = self._estimate(size, prof.seconds(self.itemsize), prof.method, prof.exact)
        return [out[s] for s in byte_sizes]
