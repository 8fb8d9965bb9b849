"""A drop-in communication hook for torch's DistributedDataParallel.

Steps:

1. Start torch.distributed as the script already does (``init_process_group`` under
   torchrun or mpirun) and wrap the model in ``DistributedDataParallel``.
2. Add one line: ``state = fmcomm.ddp.register(ddp_model, compress="fp8@inter")``
   (or, as with PyTorch's own hooks, ``ddp_model.register_comm_hook(HookState(...),
   fmcomm.ddp.hook)``). fmcomm sets itself up from the model's process group.
3. Train. Each gradient bucket is averaged over the ranks by fmcomm, asynchronously:
   the hook returns at once and the backward pass goes on computing later layers
   while the bucket travels. The first ``start_iter`` steps run uncompressed.
4. Checkpoint ``state.state_dict()`` beside the model's; after
   ``state.load_state_dict(...)`` a resumed run computes what an uninterrupted one
   would have.

Example::

    dist.init_process_group("gloo")
    model = DDP(net)
    state = fmcomm.ddp.register(model, compress="onebit@inter", start_iter=10)
    for x, y in data:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()

``compress`` takes every spec of :mod:`fmcomm.compression` (``none``, ``fp16``,
``bf16``, ``fp8``, ``onebit``, ``topk:R``, each optionally ``@inter``) and ``auto``:
until the tuner exists, ``auto`` is ``fp8@inter`` where the group spans several
nodes of equal size (the slow link carries a quarter of the bytes, at fp8's
accuracy, which needs no error feedback) and ``none`` on one node, where links are
fast enough that coding costs more than it saves.
"""
import functools
import os
import threading
import zlib
from typing import Any

import torch
import torch.distributed as dist

from . import compression
from .communicator import Communicator
from .compression import ErrorFeedback
from .config import Config
from .errors import InvalidArgument, MismatchError

AUTO = "auto"
# Buckets smaller than this go uncompressed, on a communicator of their own: on the
# emulated 2 x 2 cluster at 1 Gbit a 1 MiB all-reduce took 10.0 ms uncompressed and
# 14.4 ms as onebit@inter (whose rounds between ranks cost more than its bytes save),
# 4 MiB 39.9 against 16.2 ms. Their own communicator has its own worker, so DDP's
# small first bucket no longer holds the big ones up behind it.
DEFAULT_COMPRESS_MIN_BYTES = 2 << 20


class HookState:
    """What the hook needs between calls; one per DDP model.

    Fields by role:

    * where: ``process_group`` (None: torch's default group); the fmcomm
      communicator made from it on first use (not pickled);
    * what: ``compress`` (a spec, or ``auto``), ``start_iter`` (steps run
      uncompressed first: DDP rebuilds its buckets after the first step, and error
      feedback should start from settled buckets), ``compress_min_bytes``
      (buckets smaller than this are averaged uncompressed, on a second
      communicator of the same ranks so that they never wait behind a big one; 0
      compresses every bucket);
    * carried over steps: ``step`` (counted once per backward, at its last bucket),
      ``error_feedback`` (the residuals, one key per bucket's set of parameters),
      and per key the order of parameters its residuals follow;
    * counted: ``group_buckets``, the buckets handed straight to the process
      group's own all-reduce (uncompressed, every rank on one node: see
      :meth:`hands_uncompressed_to_group`).
    """

    def __init__(self, process_group=None, compress: str = "none", start_iter: int = 10, *,
                 error_feedback: "ErrorFeedback | None" = None, compress_min_bytes: int = DEFAULT_COMPRESS_MIN_BYTES):
        if isinstance(compress_min_bytes, bool) or not isinstance(compress_min_bytes, int) or compress_min_bytes < 0:
            raise InvalidArgument(f"compress_min_bytes must be an integer >= 0, got {compress_min_bytes!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise InvalidArgument(f"start_iter must be an integer >= 0, got {start_iter!r}")
        if not isinstance(compress, str):
            raise InvalidArgument(f"compress must be a string such as 'fp8@inter' or 'auto', got "
                                  f"{type(compress).__name__}")
        self.compress = compress.strip().lower()
        if self.compress != AUTO:
            spec = compression.parse(self.compress)  # InvalidArgument that says what is wrong
            if spec.enabled and spec.compressor.error_feedback and start_iter < 1:
                raise InvalidArgument(f"compress={compress!r} keeps error feedback per bucket, and DDP rebuilds "
                                      f"its buckets after the first step: start_iter must be >= 1")
        self.process_group = process_group
        self.start_iter = start_iter
        self.compress_min_bytes = compress_min_bytes
        self.step = 0
        self.group_buckets = 0  # buckets handed to the process group's own all-reduce (one node, uncompressed)
        self.error_feedback = error_feedback if error_feedback is not None else ErrorFeedback()
        self._comm: "Communicator | None" = None
        self._small: "Communicator | None" = None  # the same ranks, for buckets below compress_min_bytes
        self._spec = None
        self._params: "set[int] | None" = None  # ids of the model's parameters, learned in the first backward
        self._seen: set[int] = set()
        self._param_index: "dict[int, int] | None" = None  # id(parameter) -> its position in the model
        self._layouts: dict[str, list[int]] = {}  # error-feedback key -> parameter positions in coding order
        self._agreed: set = set()  # (key, spec, count, dtype, on the second communicator) every rank confirmed
        self._lock = threading.Lock()

    # ------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        keep = {k: v for k, v in self.__dict__.items() if k not in ("process_group", "_comm", "_small", "_lock",
                                                                   "_spec")}
        keep["_params"] = None  # object ids mean nothing in another process
        keep["_seen"] = set()
        keep["_param_index"] = None
        keep["_agreed"] = set()
        return keep

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.process_group, self._comm, self._small, self._spec = None, None, None, None
        self._lock = threading.Lock()

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "compress": self.compress, "start_iter": self.start_iter,
                "error_feedback": self.error_feedback.state_dict(),
                "layouts": {k: list(v) for k, v in self._layouts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("step", "error_feedback"):
            if name not in state:
                raise InvalidArgument(f"HookState.load_state_dict: missing {name!r}")
        if state.get("compress", self.compress) != self.compress:
            raise InvalidArgument(f"HookState.load_state_dict: checkpoint was made with compress="
                                  f"{state['compress']!r}, this state has {self.compress!r}")
        layouts = state.get("layouts", {})
        if not isinstance(layouts, dict) or not all(
                isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v)
                for k, v in layouts.items()):
            raise InvalidArgument("HookState.load_state_dict: 'layouts' must map str keys to lists of "
                                  "parameter positions")
        self.step = int(state["step"])
        self.error_feedback.load_state_dict(state["error_feedback"])
        self._layouts = {k: list(v) for k, v in layouts.items()}
        self._agreed = set()  # every rank loads: every rank confirms its buckets afresh

    def close(self) -> None:
        """Finish the buckets in flight and release fmcomm's communicators (worker threads,
        node groups, shared memory); the process group stays the caller's. A later
        bucket makes them afresh, a collective, so every rank closes at the same step.
        Residuals and the step count are kept."""
        for comm in (self._small, self._comm):
            if comm is not None:
                comm.close()
        self._comm = self._small = self._spec = None
        self._agreed = set()  # the new communicators confirm every bucket afresh

    # -------------------------------------------------------------- helpers
    def communicator(self) -> Communicator:
        """The fmcomm communicator over the process group, made on first use (a collective)."""
        if self._comm is None:
            from .transport.torch_dist import TorchTransport
            if not dist.is_initialized():
                raise InvalidArgument("fmcomm.ddp: torch.distributed is not initialized; call "
                                      "init_process_group before training")
            # DDP itself keeps every rank's buckets alike (it checks the parameters'
            # shapes across ranks and hands rank 0's rebuilt layout to all), so the hook
            # agrees on its arguments once per bucket (``_agree``) instead of in a header
            # round before every collective, which cost 10% of a step on one box.
            # FMCOMM_CHECK set by the user still decides.
            check = None if "FMCOMM_CHECK" in os.environ else False
            self._comm = Communicator(TorchTransport(self.process_group),
                                      Config.from_env(transport="torch", check=check))
        return self._comm

    def small_communicator(self) -> Communicator:
        """A second communicator over the same ranks (a collective, made on first use)."""
        if self._small is None:
            comm = self.communicator()
            self._small = comm.new_group(range(comm.world))
            self._small.executor.stats = comm.executor.stats  # one count of the hook's bytes
        return self._small

    def hands_uncompressed_to_group(self) -> bool:
        """Whether uncompressed buckets go straight to the process group's own all-reduce.

        So they do where every rank is on one node: there fmcomm's own algorithms gain
        nothing over the engine's, and on one box of 4 ranks (80 steps, configs taking
        turns) handing them to fmcomm's worker cost 0.91 of PyTorch's default DDP speed
        where PyTorch's own ``allreduce_hook`` cost 0.98. Across nodes fmcomm's
        hierarchical all-reduce goes on carrying them.
        """
        return self.communicator().topology.nodes == 1

    def spec(self):
        if self._spec is None:
            text = self.compress
            if text == AUTO:
                text = "fp8@inter" if self.communicator().levels() is not None else "none"
            self._spec = compression.parse(text)
        return self._spec

    def _check_model(self, bucket) -> None:
        # The first backward this state sees (after creation or unpickling) names the
        # model's parameters; every later bucket must hold only those.
        ids = {id(p) for p in bucket.parameters()}
        if self._params is None:
            self._seen |= ids
            if bucket.is_last():
                self._params = set(self._seen)
            return
        if not ids <= self._params:
            raise InvalidArgument("fmcomm.ddp: this HookState belongs to another model (a bucket holds "
                                  "parameters it has not seen); make one HookState per DDP model")


def _future_of(work, result: torch.Tensor) -> "torch.futures.Future[torch.Tensor]":
    fut: torch.futures.Future = torch.futures.Future()

    def done(f) -> None:
        err = f.exception()
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(result)
    work.add_done_callback(done)
    return fut


def _coding_layout(state: "HookState", bucket):
    """(key, the bucket's slices in the order this state codes them) or (key, None).

    DDP lays a bucket out in the order gradients became ready in the first step
    and rebuilds it after that step, so a resumed run's first buckets are laid out
    differently from the uninterrupted run's at the same step. The error-feedback
    residuals belong to one order of the values: the state records, per set of
    parameters, the order it first coded them in (the rebuilt buckets' in a run
    that starts compressing after the first step) and codes them in that order
    ever after. Only a bucket in another order (a resumed run's first step) is
    copied into it and back; every other bucket is coded where it lies.
    """
    if state._param_index is None:
        return f"bucket{bucket.index()}", None
    entries, off = [], 0
    for p in bucket.parameters():
        entries.append((state._param_index.get(id(p), -1), off, p.numel()))
        off += p.numel()
    members = sorted((i, n) for i, _, n in entries)  # which parameters, not where this layout put them
    key = f"params{members[0][0]}-{members[-1][0]}-{zlib.crc32(repr(members).encode()):08x}"
    order = [i for i, _, _ in entries]
    coded = state._layouts.setdefault(key, order)
    if coded == order:
        return key, None
    position = {i: r for r, i in enumerate(coded)}
    return key, sorted(entries, key=lambda e: position[e[0]])


def hook(state: "HookState", bucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket``'s gradients over the group; returns at once with a Future."""
    if not isinstance(state, HookState):
        raise InvalidArgument(f"fmcomm.ddp.hook needs a fmcomm.ddp.HookState, got {type(state).__name__}")
    grads = bucket.buffer()
    with state._lock:
        state._check_model(bucket)
        comm = state.communicator()
        compressing = state.step >= state.start_iter and state.spec().enabled
        spec = key = slices = None  # spec None: averaged uncompressed
        if compressing:
            # Small buckets are coded in the recorded layout too: an uncompressed sum's
            # rounding depends on where a value sits (the ring starts each chunk at
            # another rank), and a resumed run must add alike.
            key, slices = _coding_layout(state, bucket)
            if grads.numel() * grads.element_size() < state.compress_min_bytes:
                comm = state.small_communicator()
            else:
                spec = state.spec()
                if spec.compressor.elementwise:
                    slices = None  # codes every value alike wherever it lies: no reorder needed
                if spec.level == "inter":
                    comm.levels()  # made here, on every rank in bucket order: the worker cannot make groups
        agree = (key or f"bucket{bucket.index()}", spec.text if spec is not None else "none", grads.numel(),
                 str(grads.dtype), comm is state._small)
        if spec is None and comm is state._comm and state.hands_uncompressed_to_group():
            # One node, uncompressed: the process group's own asynchronous all-reduce
            # (as PyTorch's allreduce_hook), no hop through fmcomm's worker thread.
            if agree not in state._agreed:
                # First sight: the agreement runs on the worker, and this thread waits
                # for it (once per bucket and setting), so that every all-reduce on the
                # group leaves from this thread, in bucket order on every rank, and a
                # first step (a resumed run's too) adds exactly as every later one.
                comm.run_async(functools.partial(_agree, comm, agree)).wait()
                state._agreed.add(agree)
            # Scaled as DDP's own reducer scales a bucket (times 1/world, not divided by
            # world): "none" on one node is then plain DDP, bit for bit.
            grads.mul_(1.0 / comm.world)
            state.group_buckets += 1
            fut = dist.all_reduce(grads, group=state.process_group, async_op=True).get_future().then(
                lambda f: f.value()[0])
        elif agree in state._agreed and slices is None:
            fut = _future_of(_average(comm, grads, spec, state, key, async_op=True), grads)
        else:
            # First sight of this bucket and setting (or a bucket to reorder): on the
            # worker, as every bucket's work: the hook runs on the autograd thread, and
            # every millisecond spent here holds up the backward pass.
            first = agree not in state._agreed
            state._agreed.add(agree)
            fut = _future_of(comm.run_async(lambda: _reduce(comm, grads, slices, spec, state, key,
                                                            agree if first else None)), grads)
        if bucket.is_last():
            state.step += 1
    return fut


def _reduce(comm, grads: torch.Tensor, slices, spec, state: "HookState", key, agree) -> None:
    """Average ``grads`` (reordered into the coding layout by ``slices`` where given),
    first confirming ``agree`` with every rank where given."""
    if agree is not None:
        _agree(comm, agree)
    if slices is None:
        _average(comm, grads, spec, state, key)
        return
    values = torch.cat([grads[o:o + n] for _, o, n in slices])
    _average(comm, values, spec, state, key)
    at = 0
    for _, o, n in slices:
        grads[o:o + n].copy_(values[at:at + n])
        at += n


def _average(comm, t: torch.Tensor, spec, state: "HookState", key, async_op: bool = False):
    """The average of ``t`` over the ranks, compressed by ``spec`` (None: uncompressed)."""
    return comm.all_reduce(t, op="avg", compress=spec, state=state.error_feedback, key=key, async_op=async_op)


def _agree(comm, agree: tuple) -> None:
    """Every rank hooks the same bucket with the same setting, or every rank raises MismatchError."""
    mine = torch.tensor([zlib.crc32(repr(agree).encode())], dtype=torch.int64)
    every = torch.empty(comm.world, dtype=torch.int64)
    comm.all_gather(every, mine)
    differ = [r for r in range(comm.world) if every[r] != mine[0]]
    if differ:
        raise MismatchError(f"fmcomm.ddp: rank {comm.rank} averages bucket {agree[0]!r} ({agree[2]} {agree[3]}) "
                            f"with compress={agree[1]!r}, rank {differ[0]} with another bucket or setting "
                            f"(one HookState per model, made alike on every rank)",
                            rank=comm.rank, op="all_reduce", peer=differ[0])


def register(ddp_model, compress: str = "none", start_iter: int = 10, process_group=None, *,
             compress_min_bytes: int = DEFAULT_COMPRESS_MIN_BYTES) -> HookState:
    """Register fmcomm's hook on ``ddp_model`` and return its state."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise InvalidArgument(f"fmcomm.ddp.register needs a DistributedDataParallel model, got "
                              f"{type(ddp_model).__name__}")
    group = process_group if process_group is not None else getattr(ddp_model, "process_group", None)
    state = HookState(group, compress=compress, start_iter=start_iter, compress_min_bytes=compress_min_bytes)
    state._param_index = {id(p): i for i, p in enumerate(ddp_model.module.parameters())}
    ddp_model.register_comm_hook(state, hook)
    return state
