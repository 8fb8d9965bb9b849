"""The cost model's prediction for fmcomm.moe's two routes on a preset machine, 8 to 256 nodes.

    .venv/bin/python benchmarks/moe_routes_predicted.py [--topology dgx-h100] [--nodes 8,16,...]
        [--tokens 128,4096] [--hidden 7168] [--topk 8] [--itemsize 2]

Uniform routing: every rank sends every rank n/P of its n = T·K·H·itemsize dispatched
bytes (P ranks, N nodes of L). Each route's exchanges are priced as fmcomm's
``scattered`` all-to-all schedule (every send and receive posted at once) by the cost
model (``fmcomm.tuning.cost.Pricer``):

* direct: one all-to-all of n bytes per rank over all P ranks;
* hierarchical: an all-to-all of n bytes per rank inside one node (L ranks), then one
  lane's all-to-all of n bytes per rank over N ranks, one per node. The L lanes run at
  the same time on different GPUs and NICs (a DGX has one NIC per GPU, rail-optimized
  fabrics keep lanes apart), so one lane's time stands for all of them; where lanes
  share a NIC this underestimates step 2.

It prices the exchanges only (no permutations, no agreement, no kernels).
"""
from __future__ import annotations

import argparse

from fmcomm.topology import presets
from fmcomm.tuning.cost import Pricer


def price(topo, nbytes: int, itemsize: int) -> float:
    return Pricer("all_to_all", "scattered", topo, itemsize).price_all([nbytes])[0].seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="dgx-h100")
    ap.add_argument("--nodes", default="8,16,32,64,128,256")
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--itemsize", type=int, default=2, help="bytes per value (2: bf16, as DeepEP's combine)")
    args = ap.parse_args()
    base = presets.load(args.topology)
    per_node = len(base.groups()[0])
    print(f"# fmcomm.moe routes on {args.topology} ({per_node} ranks per node), hidden {args.hidden}, "
          f"K {args.topk}, {args.itemsize}-byte values, uniform routing; cost model, exchanges only")
    print(f"#{'nodes':>6} {'ranks':>6} {'tokens':>7} {'bytes/rank':>12} {'direct(us)':>11} {'hier(us)':>11} "
          f"{'step1(us)':>10} {'step2(us)':>10} {'direct/hier':>11}")
    for nodes in (int(x) for x in args.nodes.split(",")):
        whole = presets.resize(base, nodes)
        node = presets.resize(base, 1)
        lane = presets.resize(base, nodes, ranks_per_node=1)
        for tokens in (int(x) for x in args.tokens.split(",")):
            n = tokens * args.topk * args.hidden * args.itemsize
            direct = price(whole, n, args.itemsize)
            step1, step2 = price(node, n, args.itemsize), price(lane, n, args.itemsize)
            hier = step1 + step2
            print(f" {nodes:>6} {nodes * per_node:>6} {tokens:>7} {n:>12} {1e6 * direct:>11.1f} {1e6 * hier:>11.1f} "
                  f"{1e6 * step1:>10.1f} {1e6 * step2:>10.1f} {direct / hier:>11.2f}")


if __name__ == "__main__":
    main()
