"""Shared memory among the ranks of one node, for the intra-node steps of ``@inter``
compressed all-reduces (``fmcomm.compressed``).

A segment is one file in /dev/shm that local rank 0 of a node communicator creates
under a random name; the name reaches the other ranks over that communicator, every
rank maps the file, and once all of them report success local rank 0 unlinks it. The
mappings stay valid, so nothing is left in /dev/shm however a process ends later. If
any rank cannot map it (no /dev/shm, permissions, no space, ranks that are not on one
filesystem), every rank learns so and gets None, and the caller uses the transport.

Layout: 64 bytes where local rank 0 writes the segment's name (so a rank that opened
some other file of that name, on another filesystem, sees that it did), then a header of
four int64 per (half, local rank), then the data: two halves of one slot per local
rank. A call runs in rounds, each sized to fit the slots. In a round each rank writes
its data and its header (step, count, round number) into its own slot of the round's
half, then all meet in one barrier of the node communicator, then each rank checks
every header against its own (a rank that called something else is a MismatchError,
not a silent wrong sum) and reads what it needs from every slot. Rounds alternate
halves, counted across calls: a rank writes a half again only after the barrier of the
round in between, which no rank passes before every rank has finished reading that
half. So one barrier per round, and none after a call.

The barrier goes through the transport with fmcomm's timeouts, so a dead peer is a
``CommTimeoutError`` rather than a hang, and its socket round trip orders the writes
before the barrier ahead of the reads after it on every rank.
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets

import torch

from ..errors import FmcommError, InvalidArgument, MismatchError

log = logging.getLogger("fmcomm")

SHM_DIR = "/dev/shm"
# A segment never grows past this; larger calls run in more rounds (a barrier each).
# Measured with 2 and 4 local ranks over gloo, 64 MiB per rank: a 32 MiB cap (8 rounds
# at 2 ranks) made the shared reduce-scatter no faster than gloo's TCP; at 256 MiB
# (one or two rounds) it took 0.56-0.58 of gloo's time. Where /dev/shm is smaller (a
# container's default 64 MB) attaching fails and the segment is retried smaller.
SEGMENT_BYTES_MAX = 256 << 20
_FIRST_SLOT_BYTES = 64 << 10  # small first segments: later calls grow it by doubling
_ALIGN = 64  # every slot starts on a cache line
_NAME_BYTES = 64  # room for the segment's name at its start; names are ASCII and shorter
_HEADER_WORDS = 4  # int64 per (half, local rank): step, count, round, unused
_STEPS = {"reduce_scatter": 1, "all_gather": 2}


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _max_slot_bytes(local: int) -> int:
    # A slot must hold at least one element per local rank (one reduce-scatter round).
    return max(_round_up(4 * local, _ALIGN), SEGMENT_BYTES_MAX // (2 * local) // _ALIGN * _ALIGN)


def _layout(local: int, slot_bytes: int) -> tuple[int, int]:
    """(offset of the data, size of the segment) in bytes."""
    data = _round_up(_NAME_BYTES + 2 * local * _HEADER_WORDS * 8, _ALIGN)
    return data, data + 2 * local * slot_bytes


def _map(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _create(path: str, size: int, token: bytes) -> mmap.mmap:
    """The new file ``path`` mapped, with ``token`` at its start; removed again on failure."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # fallocate, not only ftruncate: tmpfs hands out pages when they are first
        # touched, so a full /dev/shm would be a SIGBUS in the middle of a collective;
        # reserved now, it is an ENOSPC here, before anyone relies on the segment.
        os.posix_fallocate(fd, 0, size)
        mapping = _map(fd, size)
    except BaseException:
        _remove(path)
        raise
    finally:
        os.close(fd)  # the mapping keeps the file alive
    mapping[:len(token)] = token
    return mapping


def _open(path: str, size: int, token: bytes) -> mmap.mmap | None:
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            return None
        mapping = _map(fd, size)
    finally:
        os.close(fd)
    if mapping[:len(token)] != token:
        mapping.close()
        return None
    return mapping


class NodeSharedMemory:
    """One mapped segment of a node communicator (see the module docstring).

    Made only by :meth:`attach`; its slots hold ``slot_bytes`` each, and calls larger
    than that run in several rounds.
    """

    def __init__(self, comm, mapping: mmap.mmap, slot_bytes: int):
        self._comm = comm
        self._mapping: mmap.mmap | None = mapping
        self.slot_bytes = slot_bytes
        self.slot_elements = slot_bytes // 4
        local = comm.world
        data_offset, _ = _layout(local, slot_bytes)
        self._headers = torch.frombuffer(mapping, dtype=torch.int64, count=2 * local * _HEADER_WORDS,
                                         offset=_NAME_BYTES).view(2, local, _HEADER_WORDS)
        self._data = torch.frombuffer(mapping, dtype=torch.float32, count=2 * local * self.slot_elements,
                                      offset=data_offset).view(2, local, self.slot_elements)
        self._round = 0

    @classmethod
    def attach(cls, comm, slot_bytes: int) -> "NodeSharedMemory | None":
        """A segment with slots of at least ``slot_bytes`` for every rank of ``comm``, or None.

        A collective over ``comm``: every rank calls it at the same point with the same
        ``slot_bytes``, and either every rank gets a segment or every rank gets None.
        """
        local, me = comm.world, comm.rank
        slot_bytes = _round_up(max(slot_bytes, 4 * local, 1), _ALIGN)
        _, size = _layout(local, slot_bytes)
        name_words = torch.zeros(_NAME_BYTES // 4, dtype=torch.int32)  # int32: a dtype every transport broadcasts
        created: str | None = None
        mapping: mmap.mmap | None = None
        try:
            if me == 0:
                name = f"fmcomm-{os.getpid()}-{secrets.token_hex(8)}"
                path = os.path.join(SHM_DIR, name)
                try:
                    mapping = _create(path, size, name.encode())
                    created = path
                except (OSError, ValueError) as e:
                    log.debug("node rank 0: no shared memory segment in %s (%s)", SHM_DIR, e)
                else:
                    encoded = name.encode()
                    name_words.view(torch.uint8)[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
            if local > 1:
                comm.broadcast(name_words, src=0)
            name = bytes(name_words.view(torch.uint8).tolist()).rstrip(b"\0").decode()
            if me != 0 and name:
                try:
                    mapping = _open(os.path.join(SHM_DIR, name), size, name.encode())
                except (OSError, ValueError) as e:
                    log.debug("node rank %d: cannot map shared memory segment %s (%s)", me, name, e)
            mapped = torch.tensor([1 if mapping is not None else 0], dtype=torch.int32)
            if local > 1:
                comm.all_reduce(mapped, op="min")
            if not mapped.item():
                return None
            segment, mapping = cls(comm, mapping, slot_bytes), None
            return segment
        finally:
            if created is not None:
                _remove(created)
            if mapping is not None:
                mapping.close()

    # ------------------------------------------------------------ collectives
    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """out = Σ over local ranks r of inp_r's block of this rank, added in rank order.

        ``inp`` holds world·k float32 values, ``out`` k; block j is inp[j·k:(j+1)·k].
        The sum is ((x_0 + x_1) + x_2) + ... in float32, whatever the timing.
        ``out`` may be this rank's own block of ``inp``.
        """
        local, me = self._comm.world, self._comm.rank
        k = out.numel()
        self._check("reduce_scatter", out, inp, k, local * k)
        if not k:
            return  # every rank has the same sizes: nothing moves, nothing to wait for
        step = min(k, self.slot_elements // local)
        blocks = inp.view(local, k)
        # This rank's own block is read from its input, not through the segment, unless
        # the output overwrites it before its turn in the sum comes.
        own_via_segment = _overlaps(out, inp) and me != 0
        for start in range(0, k, step):
            count = min(step, k - start)
            half = self._round % 2
            slot = self._data[half, me, :local * count].view(local, count)
            for r in range(local):
                if r != me or own_via_segment:
                    slot[r].copy_(blocks[r, start:start + count])
            self._meet(half, "reduce_scatter", k)
            mine = slice(me * count, (me + 1) * count)
            parts = [blocks[me, start:start + count] if r == me and not own_via_segment
                     else self._data[half, r, mine] for r in range(local)]
            acc = out[start:start + count]
            if local == 1:
                acc.copy_(parts[0])
                continue
            torch.add(parts[0], parts[1], out=acc)
            for part in parts[2:]:
                acc.add_(part)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """Every local rank's ``inp`` (k float32 values), in rank order, into every rank's ``out``."""
        local, me = self._comm.world, self._comm.rank
        k = inp.numel()
        self._check("all_gather", out, inp, local * k, k)
        if not k:
            return
        step = min(k, self.slot_elements)
        gathered = out.view(local, k)
        own_in_place = gathered[me].data_ptr() == inp.data_ptr()
        for start in range(0, k, step):
            count = min(step, k - start)
            half = self._round % 2
            self._data[half, me, :count].copy_(inp[start:start + count])
            self._meet(half, "all_gather", k)
            for r in range(local):
                if r != me:
                    gathered[r, start:start + count].copy_(self._data[half, r, :count])
        if not own_in_place:
            gathered[me].copy_(inp)  # after the rounds: inp may overlap other ranks' rows of out

    def _check(self, what: str, out: torch.Tensor, inp: torch.Tensor, out_count: int, inp_count: int) -> None:
        if self._mapping is None:
            raise FmcommError(f"node rank {self._comm.rank}: {what} on a closed shared memory segment")
        for name, t, count in (("output", out, out_count), ("input", inp, inp_count)):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != count:
                raise InvalidArgument(f"shared memory {what}: {name} must be {count} contiguous float32 on the "
                                      f"CPU, got {t.numel()} {t.dtype} on {t.device}")

    def _meet(self, half: int, what: str, count: int) -> None:
        """Publish this round's header, wait for every local rank, check they all did the same."""
        me = self._comm.rank
        header = self._headers[half]
        header[me, 0], header[me, 1], header[me, 2] = _STEPS[what], count, self._round
        self._comm.barrier()
        differ = (header != header[me]).any(dim=1).nonzero()
        if differ.numel():
            peer = int(differ[0])
            step, peer_count, peer_round = header[peer, :3].tolist()
            called = {v: k for k, v in _STEPS.items()}.get(step, f"step {step}")
            self.close()  # the ranks no longer agree on what the slots hold
            raise MismatchError(f"shared memory {what} of {count} elements per rank, round {self._round}: node "
                                f"rank {peer} is at {called} of {peer_count}, round {peer_round}",
                                rank=me, op=what, peer=peer)
        self._round += 1

    def close(self) -> None:
        """Unmap the segment (this rank's mapping only; the others keep theirs)."""
        if self._mapping is None:
            return
        # The views do not pin the mapping (torch.frombuffer releases its buffer), so
        # they go first: nothing may touch the memory once it is unmapped.
        self._headers = self._data = None
        mapping, self._mapping = self._mapping, None
        mapping.close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SharedMemoryCache:
    """The segment of one node communicator: attached on first use, grown on demand.

    ``get`` is a collective of the node communicator whenever it attaches; every rank
    calls it with the same sizes, so every rank decides alike whether to.
    """

    def __init__(self, comm):
        self._comm = comm
        self.segment: NodeSharedMemory | None = None
        self.attaches = 0  # attach attempts, successful or not
        self._refused_from: int | None = None  # slot size from which attaching failed

    def get(self, slot_bytes: int) -> NodeSharedMemory | None:
        """A segment whose slots hold ``slot_bytes`` (or the most a segment may), else a
        smaller one (the call then runs in more rounds), else None."""
        want = min(slot_bytes, _max_slot_bytes(self._comm.world))
        have = self.segment
        if have is not None and have.slot_bytes >= want:
            return have
        if self._refused_from is not None and want >= self._refused_from:
            return have
        size = min(_max_slot_bytes(self._comm.world),
                   max(want, 2 * have.slot_bytes if have is not None else _FIRST_SLOT_BYTES))
        grown = None
        while grown is None:
            self.attaches += 1
            grown = NodeSharedMemory.attach(self._comm, size)
            if grown is None:
                # Too big for this /dev/shm (a container's is often 64 MB): smaller
                # slots only cost more rounds. Every rank saw the same refusal.
                self._refused_from = size if self._refused_from is None else min(self._refused_from, size)
                size //= 4
                if size < _FIRST_SLOT_BYTES or (have is not None and size <= have.slot_bytes):
                    return have
        if have is not None:
            have.close()
        self.segment = grown
        return grown

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None
