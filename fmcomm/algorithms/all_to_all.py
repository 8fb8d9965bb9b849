"""All-to-all schedule: pairwise exchange, uneven splits.

Layout (``torch.distributed.all_to_all_single``): ``counts[i][j]`` is the number of
elements rank i sends to rank j (zeros allowed). Rank r's ``input`` is its blocks to
ranks 0, 1, …, p−1 back to back (block j has counts[r][j] elements, from offset
Σ_{j'<j} counts[r][j']); its ``output`` is the blocks from ranks 0, 1, …, p−1 back to
back (block i has counts[i][r] elements). Input and output sizes therefore differ
from rank to rank (see the note at the end). Below p is the world size, n_r the bytes
of rank r's input, α the latency of a message and β the time per byte.

pairwise(rank, world, counts)
    Round 0: rank r copies its own block (to itself) into place. Round k = 1..p−1:
    rank r sends its block for (r+k) mod p and receives the block from (r−k) mod p
    straight into its place in ``output``. Empty blocks send nothing (both ends know
    the size). Out of place, as torch's call always is; input is never written.

    Bytes sent per rank: Σ_{j≠r} counts[r][j]·itemsize (everything but its own block;
    n_r·(p−1)/p for an even split). Cost: (p−1)α + Σ_k max_r counts[r][(r+k) mod p]·
    itemsize·β, which is (p−1)α + ((p−1)/p)nβ for an even split of n bytes per rank.

    Staging: ``fmcomm.schedule.validate`` checks every round with input and output as
    one memory from offset 0. Where a round's receive would land on output offsets
    that overlap the input offsets that round sends (always round p/2 of an even split
    on an even world), or the own block's input and output offsets overlap partly, that
    block goes through scratch instead (received there, or copied there in round 0) and
    a last local round copies it into place. Scratch: the staged blocks' total.
    Wire traffic is the same; the cost is one extra local copy of those blocks.

Note: one ``Schedule`` has one input_count and output_count for all ranks; build it
with the largest row and column sums (and validate with output_written=False, each
rank's real output being [0, Σ_i counts[i][r]) — every element of it is written).
"""
from __future__ import annotations

from ..errors import InvalidArgument
from ..schedule import Range, RankSchedule, RoundBuilder


def check_counts(world: int, counts) -> tuple[tuple[int, ...], ...]:
    """``counts`` as a world x world tuple of non-negative ints, or InvalidArgument."""
    try:
        rows = tuple(tuple(row) for row in counts)
    except TypeError as e:
        raise InvalidArgument(f"all_to_all counts must be a {world} x {world} matrix: {e}") from None
    if len(rows) != world or any(len(row) != world for row in rows):
        raise InvalidArgument(f"all_to_all counts must be a {world} x {world} matrix, got {rows!r}")
    for row in rows:
        for x in row:
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise InvalidArgument(f"all_to_all counts must be non-negative integers, got {x!r}")
    return rows


def _overlaps(a: Range, b: Range) -> bool:
    return a.count > 0 and b.count > 0 and a.offset < b.end and b.offset < a.end


def pairwise(rank: int, world: int, counts) -> RankSchedule:
    c = check_counts(world, counts)
    p, r = world, rank
    in_off, out_off = [0] * p, [0] * p
    for j in range(1, p):
        in_off[j] = in_off[j - 1] + c[r][j - 1]
        out_off[j] = out_off[j - 1] + c[j - 1][r]

    def block_in(j: int) -> Range:
        return Range("input", in_off[j], c[r][j])

    def block_out(i: int) -> Range:
        return Range("output", out_off[i], c[i][r])

    b = RoundBuilder(r)
    staged: list[tuple[Range, Range]] = []  # (scratch, output) to copy at the end
    used = 0

    def stage(dst: Range) -> Range:
        nonlocal used
        s = Range("scratch", used, dst.count)
        used += dst.count
        staged.append((s, dst))
        return s

    b.new_round()
    src, dst = block_in(r), block_out(r)
    if _overlaps(src, dst) and src.offset != dst.offset:
        b.copy(stage(dst), src)
    else:
        b.copy(dst, src)
    for k in range(1, p):
        b.new_round()
        to, frm = (r + k) % p, (r - k) % p
        src, dst = block_in(to), block_out(frm)
        b.send(to, src)
        b.recv(frm, stage(dst) if _overlaps(src, dst) else dst)
    if staged:
        b.new_round()
        for s, dst in staged:
            b.copy(dst, s)
    b.need_scratch(used)
    return b.build()


def scattered(rank: int, world: int, counts) -> RankSchedule:
    """Every block in one round, as MPI's "scattered" all-to-all posts them.

    One round: rank r copies its own block into place and posts all p−1 sends and
    p−1 receives at once, so no round boundary idles a link while another is busy
    (pairwise's rounds pair ranks on one node in some rounds, leaving the network
    idle). Bytes sent per rank: Σ_{j≠r} counts[r][j]·itemsize, as pairwise.
    Cost: (p−1)α overlapped into about α + max over links of the bytes on it ·β.
    Needs separate input and output buffers (validated with ``in_place=False``;
    ``all_to_all_single`` refuses overlapping ones).
    """
    counts = check_counts(world, counts)
    b = RoundBuilder(rank)
    b.new_round()
    send_off = [sum(counts[rank][:j]) for j in range(world)]
    recv_off = [sum(counts[i][rank] for i in range(src)) for src in range(world)]
    b.copy(Range("output", recv_off[rank], counts[rank][rank]), Range("input", send_off[rank], counts[rank][rank]))
    for k in range(1, world):
        to, frm = (rank + k) % world, (rank - k) % world
        b.recv(frm, Range("output", recv_off[frm], counts[frm][rank]))
        b.send(to, Range("input", send_off[to], counts[rank][to]))
    return b.build()
