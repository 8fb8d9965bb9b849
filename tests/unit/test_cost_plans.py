"""The compressed all-reduce's plan of phases (fmcomm.tuning.plans) against its closed form."""
from __future__ import annotations

import dataclasses
import math

import pytest

from fmcomm.compression import parse
from fmcomm.errors import InvalidArgument, TopologyError
from fmcomm.topology.model import CodecRates
from fmcomm.tuning.plans import price_compressed_all_reduce
from test_cost import A_EX, A_IN, B_EX, B_IN, CPY, ITEM, RED, fig, machine

ENC, DEC = 1.5e9, 3e9


def with_codecs(topo):
    return dataclasses.replace(topo, codecs=tuple(CodecRates(f, fig(ENC), fig(DEC)) for f in ("onebit", "fp8", "topk")))


@pytest.mark.parametrize("nodes, per", [(2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("spec", ["onebit@inter", "fp8:block=64@inter", "topk:0.01@inter"])
def test_inter_plan_is_the_sum_of_its_phases(nodes, per, spec):
    n = nodes * per * 4096                     # elements
    chunk = n // (per * nodes)
    payload = parse(spec).compressor.payload_bytes(chunk)
    L, N = per, nodes
    expected = (
        (L - 1) * (A_IN + n / L * ITEM / B_IN + n / L * ITEM / RED)           # 1. ring reduce-scatter in the node
        + A_EX + (N - 1) * payload / B_EX                                      # 2. coded exchange (N-1 payloads a port)
        + (N - 1) * chunk * ITEM / ENC + (N - 1) * chunk * ITEM / DEC + chunk * ITEM / ENC
        + A_EX + (N - 1) * payload / B_EX                                      # 3. the sums' payloads
        + N * payload / CPY + (L - 1) * (A_IN + N * payload / B_IN)           # 4. ring all-gather of the lane's payloads
        + n * ITEM / DEC)                                                      # 5. decode everything
    got = price_compressed_all_reduce(with_codecs(machine(nodes, per)), n * ITEM, spec).seconds
    assert math.isclose(got, expected, rel_tol=1e-12), (got, expected)


def test_flat_plan_over_every_rank():
    nodes, per = 2, 2
    p = nodes * per
    n = p * 4096
    chunk = n // p
    payload = parse("onebit").compressor.payload_bytes(chunk)
    # node 0's two ranks each send 1 payload inside the node and 2 to the other node, at once
    exchange = max(A_IN + payload / B_IN, A_EX + 2 * payload / B_EX)
    expected = (2 * exchange + (p - 1) * chunk * ITEM / ENC + (p - 1) * chunk * ITEM / DEC + chunk * ITEM / ENC
                + n * ITEM / DEC)
    got = price_compressed_all_reduce(with_codecs(machine(nodes, per)), n * ITEM, "onebit").seconds
    assert math.isclose(got, expected, rel_tol=1e-12)


def test_what_cannot_be_priced_says_why():
    with pytest.raises(InvalidArgument, match="compresses nothing"):
        price_compressed_all_reduce(with_codecs(machine(2, 2)), 1 << 20, "none")
    with pytest.raises(TopologyError, match="no kernel rates for the onebit compressor"):
        price_compressed_all_reduce(machine(2, 2), 1 << 20, "onebit@inter")
