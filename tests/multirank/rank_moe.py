"""fmcomm.moe dispatch and combine on this rank's world.

``--nodes K`` splits the ranks into K emulated nodes (FMCOMM_NODE_ID, set before fmcomm
starts), so ``hierarchical`` runs its two-level route (``--nodes 0``: nodes from the
hostnames, as tests/emulated runs it); ``--algos`` names the routes to run. Every rank runs every case and checks its own results against
tests/multirank/moe_reference.py, which rebuilds every rank's inputs in this process:

* round trip (identity experts, no weights, K = 1 and 2; random routing, everything
  to the last expert, everything to rank 0's experts; the last rank has no tokens):
  ``expert_tokens`` equal, bit for bit, the rows the reference says this rank's experts
  get, in order, and ``combine`` returns K·x bit for bit (x + x is exact);
* fp8: every delivered value within ``fp8_rows.error_bound`` of the exact row;
* async: the same bytes as the synchronous call;
* a layer (router, softmax top-2, tanh experts) against the reference layer in one
  process: outputs and the gradients of tokens, router (summed over ranks) and this
  rank's experts within 1e-5 of the largest reference value. Why: float32 (u = 6e-8)
  sums of at most a few hundred terms, ordered differently (matmuls over other row
  sets, the router's gradient summed over ranks), differ by at most ~1e-5 relative;
* validation: an index out of range on the last rank, weights of the wrong shape on
  rank 0, ranks disagreeing on num_experts: every rank raises the same type naming the
  rank, and the communicator then still works.
"""
import hashlib
import traceback

import torch

from common import launcher_rank_world, parse, report_and_exit, split_into_nodes  # noqa: E402

RANK, WORLD = launcher_rank_world()
ARGS = parse({"--nodes": {"type": int, "default": 1}, "--algos": {"default": "direct"},
              "--layer": {"action": "store_true"}, "--expect-nodes": {"type": int, "default": 0}})
if ARGS.nodes:
    split_into_nodes(ARGS.nodes)

import fmcomm  # noqa: E402
import fmcomm.moe as moe  # noqa: E402
from fmcomm.moe import fp8_rows  # noqa: E402
from moe_reference import ReferenceLayer, expected_rows, routing_on, tokens_on  # noqa: E402

HIDDEN = 12
LAYER_TOLERANCE = 1e-5


def digest(t) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main():
    comm = fmcomm.init(transport=ARGS.transport)
    world, rank = comm.world, comm.rank
    num_experts = 2 * world
    # Emulated (--nodes K) or real nodes (--nodes 0: hostnames, tests/emulated): hierarchical
    # runs its two steps wherever the ranks span several nodes of equal size.
    several_nodes = comm.levels() is not None
    report = {}
    if ARGS.expect_nodes:  # nodes found from hostnames: the routes above would pass on one node too
        report["topology"] = {"ok": len(set(comm.topology.node_of)) == ARGS.expect_nodes and several_nodes}

    def case(key, fn):
        try:
            report[key] = {"ok": bool(fn())}
        except Exception:  # noqa: BLE001 - reported; the test fails on it
            report[key] = {"ok": False, "error": traceback.format_exc()}

    def inputs(tag, kind, k):
        xs = [tokens_on(r, world, tag, HIDDEN) for r in range(world)]
        idxs = [routing_on(r, world, tag, kind, xs[r].shape[0], k, num_experts) for r in range(world)]
        return xs, idxs

    for algo in ARGS.algos.split(","):
        for k in (1, 2):
            for kind in ("random", "one_expert", "first_rank"):
                def round_trip(algo=algo, k=k, kind=kind):
                    xs, idxs = inputs(f"{kind}/{k}", kind, k)
                    got, handle = moe.dispatch(xs[rank], idxs[rank], num_experts, algo=algo)
                    want = expected_rows(rank, world, xs, idxs, num_experts)
                    back = moe.combine(got, handle)
                    return (torch.equal(got, want) and handle.algo == (algo if several_nodes else "direct")
                            and sum(handle.tokens_per_expert) == want.shape[0]
                            and torch.equal(back, xs[rank] * k))
                case(f"{algo}/round_trip/{kind}/k{k}", round_trip)

        def fp8(algo=algo):
            xs, idxs = inputs("fp8", "random", 2)
            xs = [x * torch.logspace(-3, 3, x.shape[0]).unsqueeze(1) for x in xs]  # rows of very different sizes
            got, handle = moe.dispatch(xs[rank], idxs[rank], num_experts, algo=algo, compress="fp8")
            want = expected_rows(rank, world, xs, idxs, num_experts)
            within = bool(((got - want).abs() <= fp8_rows.error_bound(want)).all())
            back = moe.combine(got, handle)
            return within and got.dtype == want.dtype and back.shape == xs[rank].shape
        case(f"{algo}/fp8", fp8)

        def asynchronous(algo=algo):
            xs, idxs = inputs("async", "random", 2)
            weights = torch.rand(idxs[rank].shape, generator=torch.Generator().manual_seed(rank))
            sync, handle = moe.dispatch(xs[rank], idxs[rank], num_experts, weights=weights, algo=algo)
            sync_back = moe.combine(sync * 3, handle)
            pending = moe.dispatch(xs[rank], idxs[rank], num_experts, weights=weights, algo=algo, async_op=True)
            got, handle = pending.wait()
            back = moe.combine(got * 3, handle, async_op=True).wait()
            return digest(got) == digest(sync) and digest(back) == digest(sync_back)
        case(f"{algo}/async", asynchronous)

        if ARGS.layer:
            def layer(algo=algo):
                tag = f"layer/{algo}"
                ref = ReferenceLayer(HIDDEN, num_experts, 2, tag)
                mine = ReferenceLayer(HIDDEN, num_experts, 2, tag)
                xs = [tokens_on(r, world, tag, HIDDEN).requires_grad_() for r in range(world)]
                gens = [torch.randn(x.shape, generator=torch.Generator().manual_seed(r)) for r, x in enumerate(xs)]
                ref_out = [ref.forward(x) for x in xs]
                sum((y * c).sum() for y, c in zip(ref_out, gens)).backward()

                x = xs[rank].detach().clone().requires_grad_()
                weights, experts = mine.route(x)
                expert_in, handle = moe.dispatch(x, experts, num_experts, weights=weights, algo=algo)
                local = num_experts // world
                parts = expert_in.split(handle.tokens_per_expert)
                expert_out = torch.cat([mine.expert(rank * local + e, p) for e, p in enumerate(parts)])
                y = moe.combine(expert_out, handle)
                (y * gens[rank]).sum().backward()
                router_grad = mine.router.grad.clone()
                fmcomm.all_reduce(router_grad)
                mine_experts = slice(rank * local, (rank + 1) * local)

                def close(got, want):
                    got = torch.zeros_like(want) if got is None else got.detach()
                    scale = float(want.detach().abs().max()) if want.numel() else 0.0
                    return bool(((got - want.detach()).abs() <= LAYER_TOLERANCE * max(1.0, scale)).all())
                return (close(y, ref_out[rank]) and close(x.grad, xs[rank].grad)
                        and close(router_grad, ref.router.grad)
                        and close(mine.w.grad[mine_experts], ref.w.grad[mine_experts])
                        and close(mine.b.grad[mine_experts], ref.b.grad[mine_experts]))
            case(f"{algo}/layer", layer)

    # Validation: the same error type on every rank, naming the rank at fault.
    xs, idxs = inputs("errors", "random", 2)

    def raises(kind, words, call):
        try:
            call()
        except kind as e:
            return all(w in str(e) for w in words)
        return False

    case("errors/index_out_of_range", lambda: raises(
        fmcomm.InvalidArgument, [f"rank {world - 1}", "outside"],
        lambda: moe.dispatch(torch.zeros(1, HIDDEN), torch.full((1, 2), num_experts if rank == world - 1 else 0),
                             num_experts)))
    case("errors/weights_shape", lambda: raises(
        fmcomm.InvalidArgument, ["rank 0", "weights"],
        lambda: moe.dispatch(xs[rank], idxs[rank], num_experts,
                             weights=torch.ones(idxs[rank].shape[0] + (rank == 0), 2))))
    if world > 1:
        case("errors/num_experts_disagree", lambda: raises(
            fmcomm.MismatchError, ["num_experts"],
            lambda: moe.dispatch(xs[rank], idxs[rank], num_experts * (2 if rank == 0 else 1))))
    case("errors/afterwards_still_works", lambda: torch.equal(
        moe.combine(*moe.dispatch(xs[rank], idxs[rank], num_experts)), 2 * xs[rank]))
    report_and_exit(ARGS, rank, report)


if __name__ == "__main__":
    main()
