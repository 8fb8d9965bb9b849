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
4. Checkpoint ``state.state_dict()`` beside the model's (it loads under
   ``torch.load``'s default ``weights_only=True``); after ``state.load_state_dict(...)``
   a resumed run computes what an uninterrupted one would have, bit for bit.

Example::

    dist.init_process_group("gloo")
    model = DDP(net)
    state = fmcomm.ddp.register(model, compress="onebit@inter", start_iter=10)
    for x, y in data:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    print(state.summary())

``compress`` takes every spec of :mod:`fmcomm.compression` (``none``, ``fp16``,
``bf16``, ``fp8``, ``onebit``, ``topk:R``, each optionally ``@inter``) and ``auto``:
the compressor (or none) that is fastest here for a bucket of DDP's default size
(25 MiB) among those whose relative error per all-reduce is at most ``max_error``
(:meth:`fmcomm.Communicator.compression_for`: the tuning table's measurements from
``fmcomm tune``, else the cost model on a machine file's figures, else none), and,
unless ``compress_min_bytes`` is given, compressing from the smallest measured size
where that compressor was the fastest.

.. warning::
   fmcomm's traffic runs on a process group of its own (the same ranks as the
   model's, made through that group's store), never on the model's: DDP issues
   collectives of its own on its group (the unused-parameter bitmap, buffer
   broadcasts), and a second thread sending there would meet them in another order
   on each rank.
"""

import atexit
import dataclasses
import functools
import logging
import os
import threading
import weakref
import zlib
from typing import Any

import torch
import torch.distributed as dist

from . import compression
from .communicator import Communicator
from .compression import ErrorFeedback
from .config import Config
from .errors import FmcommError, InvalidArgument, MismatchError

log = logging.getLogger("fmcomm.ddp")

AUTO = "auto"
# Buckets smaller than this go uncompressed, on a communicator of their own: on the
# emulated 2 x 2 cluster at 1 Gbit a 1 MiB all-reduce took 10.0 ms uncompressed and
# 14.4 ms as onebit@inter (whose rounds between ranks cost more than its bytes save),
# 4 MiB 39.9 against 16.2 ms. Their own communicator has its own worker, so DDP's
# small first bucket no longer holds the big ones up behind it.
DEFAULT_COMPRESS_MIN_BYTES = 2 << 20
# compress="auto" chooses for buckets of DDP's default size (bucket_cap_mb=25) and,
# unless told otherwise, allows a relative error per all-reduce of fp8's order (3.5e-2
# measured here, fmcomm/tuning/default_table.json), not 1-bit's or top-k's (0.7-1.0,
# which only error feedback over many steps makes up for).
AUTO_BUCKET_BYTES = 25 << 20
DEFAULT_MAX_ERROR = 0.05
# Version of HookState.state_dict()'s layout; a newer one is refused.
STATE_FORMAT = 2


@dataclasses.dataclass
class _Held:
    """A bucket whose averaging waits for the end of the backward pass (see ``_regroup_held``)."""
    grads: torch.Tensor
    entries: list  # (parameter position, offset in the bucket, element count)
    done: "torch.futures.Future[torch.Tensor]"


class HookState:
    """What the hook needs between calls; one per DDP model.

    Fields by role:

    * where: ``process_group`` (None: torch's default group); the fmcomm
      communicators made from it on first use, on a group of their own (not pickled);
    * what: ``compress`` (a spec, or ``auto``), ``start_iter`` (steps run
      uncompressed first: DDP rebuilds its buckets after the first step, and error
      feedback should start from settled buckets), ``compress_min_bytes``
      (buckets smaller than this are averaged uncompressed, on a second
      communicator of the same ranks so that they never wait behind a big one; 0
      compresses every bucket);
    * carried over steps: ``step`` (counted once per backward, at its last bucket),
      ``error_feedback`` (the residuals, one key per bucket's set of parameters),
      per key the order of parameters its residuals follow, and which keys the last
      step coded;
    * counted: ``group_buckets``, the buckets handed straight to the process
      group's own all-reduce (uncompressed, every rank on one node: see
      :meth:`hands_uncompressed_to_group`).

    Parameters are named by position: the order the state first sees them in its
    first backward pass (DDP's initial bucket order, the same in every process that
    builds the same model), so a checkpoint means the same in a resumed process.
    """

    def __init__(self, process_group=None, compress: str = "none", start_iter: int = 10, *,
                 error_feedback: "ErrorFeedback | None" = None, compress_min_bytes: int | None = None,
                 max_error: float = DEFAULT_MAX_ERROR):
        # None: the default, or for compress="auto" the table's measured size where it has one.
        self._min_bytes_given = compress_min_bytes is not None
        if compress_min_bytes is None:
            compress_min_bytes = DEFAULT_COMPRESS_MIN_BYTES
        if isinstance(compress_min_bytes, bool) or not isinstance(compress_min_bytes, int) or compress_min_bytes < 0:
            raise InvalidArgument(f"compress_min_bytes must be an integer >= 0, got {compress_min_bytes!r}")
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not max_error > 0:
            raise InvalidArgument(f"max_error must be a relative error > 0, got {max_error!r}")
        self.max_error = float(max_error)
        self.auto_spec = self.auto_reason = ""  # what compress="auto" chose, and why
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
        self._layouts: dict[str, list[int]] = {}  # error-feedback key -> parameter positions in coding order
        # The last step's buckets as summed: (key, parameter positions in the order
        # summed), in bucket order. A resumed run's first step sums as they did.
        self._last_step: "list[tuple[str, list[int]]]" = []
        self._numels: list[int] = []  # element count of each parameter position
        self._reset_process_local()

    def _reset_process_local(self) -> None:
        """Everything that means nothing in another process or after close()."""
        self._comm: "Communicator | None" = None
        self._small: "Communicator | None" = None  # the same ranks, for buckets below compress_min_bytes
        self._spec = None
        self._positions: "dict[int, int] | None" = None  # id(parameter) -> position, once the first backward ends
        self._learning: dict[int, int] = {}  # the same, while the first backward runs
        self._learning_numels: dict[int, int] = {}  # position -> element count, while the first backward runs
        self._agreed: set = set()  # (key, spec, count, dtype, on the second communicator) every rank confirmed
        self._lock = threading.Lock()
        self._summed_now: "list[tuple[str, list[int]]]" = []  # this backward's buckets so far, as summed
        self._held: list[_Held] = []
        self._works: list = []  # this backward's fmcomm work, waited for at its end
        self._routes: list[_Route] = []  # this backward's buckets, how each travels (for summary())
        self._route_text: "str | None" = None  # the first compressing step's routes, kept for summary()
        self._warm_up_text: "str | None" = None  # the last uncompressed step's routes
        # The checkpoint's last step (key -> order), while the first step after a load
        # runs: it sums the same sets of parameters in the same order, whatever buckets
        # this process's DDP hands over.
        self._resume: "dict[str, list[int]] | None" = dict(self._last_step) if self._last_step else None
        _LIVE.add(self)

    # ------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        keep = ("process_group", "compress", "start_iter", "compress_min_bytes", "step", "group_buckets",
                "error_feedback", "_layouts", "_last_step", "_numels", "max_error", "_min_bytes_given", "auto_spec", "auto_reason")
        d = {k: self.__dict__[k] for k in keep}
        d["process_group"] = None  # a process group does not pickle; the unpickled state uses the default group
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        d = {"max_error": DEFAULT_MAX_ERROR, "_min_bytes_given": True, "auto_spec": "", "auto_reason": "", **d}
        self.__dict__.update(d)
        self._reset_process_local()

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, strings, lists, float32 tensors): ``torch.load`` reads it with
        ``weights_only=True``."""
        return {"format": STATE_FORMAT, "step": self.step, "compress": self.compress,
                "start_iter": self.start_iter, "error_feedback": self.error_feedback.state_dict(),
                "layouts": {k: list(v) for k, v in self._layouts.items()},
                "last_step": [[k, list(o)] for k, o in self._last_step], "numels": list(self._numels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise InvalidArgument(f"HookState.load_state_dict needs a dict, got {type(state).__name__}")
        if int(state.get("format", 1)) > STATE_FORMAT:
            raise InvalidArgument(f"HookState.load_state_dict: checkpoint format {state['format']} is newer than "
                                  f"this fmcomm reads ({STATE_FORMAT})")
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
        last = state.get("last_step", [])
        if not isinstance(last, (list, tuple)) or not all(
                isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str)
                and isinstance(e[1], (list, tuple)) and all(isinstance(i, int) for i in e[1]) for e in last):
            raise InvalidArgument("HookState.load_state_dict: 'last_step' must list [key, parameter positions] "
                                  "pairs")
        last = [(k, list(o)) for k, o in last]
        numels = [int(n) for n in state.get("numels", [])]
        if self._positions is not None and numels and numels != self._numels:
            raise InvalidArgument("HookState.load_state_dict: the checkpoint's parameters differ from this "
                                  "model's (another model, or another parameter order)")
        self.step = int(state["step"])
        self.error_feedback.load_state_dict(state["error_feedback"])
        self._layouts = {k: list(v) for k, v in layouts.items()}
        self._last_step = last
        self._numels = numels or self._numels
        self._resume = dict(last) if last else None
        self._agreed = set()  # every rank loads: every rank confirms its buckets afresh

    def close(self) -> None:
        """Finish the buckets in flight and release fmcomm's communicators (worker threads,
        groups, shared memory); the model's process group stays the caller's. A later
        bucket makes them afresh, a collective, so every rank closes at the same step.
        Residuals and the step count are kept."""
        comms = (self._small, self._comm)
        self._comm = self._small = self._spec = None
        self._agreed = set()  # the new communicators confirm every bucket afresh
        for comm in comms:
            if comm is not None:
                comm.close()

    def summary(self) -> str:
        """How this state averages the model's buckets, as a user reads it.

        The setting, then one line per bucket of the first compressing step (or of
        the last step, before compression starts): its size and how it travels.
        """
        auto = (f" (resolved: {self.auto_spec}; {self.auto_reason}; max_error {self.max_error:g})" if self.auto_spec
                else f" (not resolved yet; max_error {self.max_error:g})")
        head = (f"fmcomm.ddp: compress={self.compress!r}" + (auto if self.compress == AUTO else "")
                + f", start_iter={self.start_iter}, compress_min_bytes={self.compress_min_bytes}, step {self.step}")
        routes = self._route_text or self._warm_up_text
        return head + ("\n" + routes if routes else "\n(no backward pass seen yet)")

    # -------------------------------------------------------------- helpers
    def communicator(self) -> Communicator:
        """The fmcomm communicator, on a group of its own over the model's ranks (made on first use)."""
        if self._comm is None:
            self._comm = private_communicator(self.process_group, "ddp")
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
        where PyTorch's own ``allreduce_hook`` cost 0.98. The hook calls it from the
        backward pass, in bucket order, as PyTorch's ``allreduce_hook`` does: DDP
        controls that order. Across nodes fmcomm's hierarchical all-reduce goes on
        carrying them.
        """
        return self.communicator().topology.nodes == 1

    def spec(self):
        if self._spec is None:
            text = self.compress
            if text == AUTO:
                choice = self.communicator().compression_for(AUTO_BUCKET_BYTES, self.max_error)
                text = self.auto_spec = choice.spec
                self.auto_reason = choice.reason
                if choice.min_bytes and not self._min_bytes_given:
                    self.compress_min_bytes = choice.min_bytes
            self._spec = compression.parse(text)
        return self._spec

    def _entries(self, bucket) -> list:
        """(position, offset, count) of each parameter in ``bucket``, learning positions in
        the first backward; a parameter this state has not seen after that means another model."""
        entries, off = [], 0
        for p in bucket.parameters():
            pid = id(p)
            if self._positions is not None:
                pos = self._positions.get(pid)
                if pos is None:
                    raise InvalidArgument(f"fmcomm.ddp: rank {dist.get_rank()}: this HookState belongs to another "
                                          f"model (bucket {bucket.index()} holds parameters it has not seen); "
                                          f"make one HookState per DDP model")
            else:
                pos = self._learning.setdefault(pid, len(self._learning))
                self._learning_numels[pos] = p.numel()
            entries.append((pos, off, p.numel()))
            off += p.numel()
        return entries

    def _first_backward_done(self) -> None:
        self._positions, self._learning = dict(self._learning), {}
        mine = [self._learning_numels[i] for i in range(len(self._positions))]
        self._learning_numels = {}
        if self._numels and self._numels != mine:
            raise InvalidArgument(f"fmcomm.ddp: rank {dist.get_rank()}: this state's checkpoint was made on "
                                  f"another model ({len(self._numels)} parameters of other sizes than this "
                                  f"model's {len(mine)})")
        self._numels = mine


def private_communicator(process_group, purpose: str) -> Communicator:
    """An fmcomm communicator on a group of its own over ``process_group``'s ranks (a
    collective over them), for traffic that must never meet DDP's on its group.

    DDP itself keeps every rank's buckets alike (it checks the parameters' shapes
    across ranks and hands rank 0's rebuilt layout to all), so the hook agrees on its
    arguments once per bucket (``_agree``) instead of before every collective, which
    cost 10% of a step on one box. FMCOMM_CHECK set by the user still decides.
    """
    from .transport.torch_dist import TorchTransport
    if not dist.is_initialized():
        raise InvalidArgument(f"fmcomm.{purpose}: torch.distributed is not initialized; call "
                              f"init_process_group before training")
    check = None if "FMCOMM_CHECK" in os.environ else False
    config = Config.from_env(transport="torch", check=check)
    return Communicator(TorchTransport.private(process_group, config.timeout, purpose), config)


# What holds fmcomm's communicators and is not yet closed (hook states, the
# optimizers of fmcomm.optim): closed at interpreter exit, so that no worker thread or
# group of theirs is left to be torn down under a finishing interpreter.
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _close_quietly(owner) -> None:
    """``owner.close()`` where nobody is left to hear of an earlier failure (the model
    collected, the interpreter exiting): that failure was raised when it happened."""
    try:
        owner.close()
    except Exception:  # noqa: BLE001
        log.debug("fmcomm: closing %s failed", type(owner).__name__, exc_info=True)


@atexit.register
def _close_live_states() -> None:
    for state in list(_LIVE):
        _close_quietly(state)


def _membership_key(entries) -> str:
    """The error-feedback key of a set of parameters (which ones, not where a bucket put them)."""
    members = sorted((i, n) for i, _, n in entries)
    return f"params{members[0][0]}-{members[-1][0]}-{zlib.crc32(repr(members).encode()):08x}"


def _new_future():
    """(a future to complete, the future to hand to DDP).

    DDP reads a bucket's future from C++, where an exception set on it directly
    becomes "Unable to cast ... to Tensor"; raised from a ``then`` callback, its
    message reaches ``backward()`` intact. (Its type comes back through
    ``_raise_at_backward_end``.)
    """
    done: torch.futures.Future = torch.futures.Future()
    return done, done.then(lambda f: f.value())


def _complete(done, work, result: torch.Tensor) -> None:
    def finish(f) -> None:
        err = f.exception()
        if err is not None:
            done.set_exception(err)
        else:
            done.set_result(result)
    work.add_done_callback(finish)


def _at_backward_end(fn) -> None:
    """Run ``fn`` when the autograd engine finishes this backward pass (called from inside it).

    Queued from the last bucket's hook, it runs before DDP's own end-of-backward
    callback, which DDP queues once every bucket has been handed over.
    """
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def hook(state: "HookState", bucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket``'s gradients over the group; returns at once with a Future."""
    if not isinstance(state, HookState):
        raise InvalidArgument(f"fmcomm.ddp.hook needs a fmcomm.ddp.HookState, got {type(state).__name__}")
    grads = bucket.buffer()
    with state._lock:
        entries = state._entries(bucket)
        comm = state.communicator()
        compressing = state.step >= state.start_iter and state.spec().enabled
        key, order = _membership_key(entries), [i for i, _, _ in entries]
        if state._resume is not None and state._resume.get(key) != order:
            # The first step after a load, with DDP's buckets of before its rebuild:
            # held until the backward ends, then summed as the checkpointed run summed.
            done, fut = _new_future()
            state._held.append(_Held(grads, entries, done))
            state._routes.append(_route(bucket.index(), entries, grads, "held for the checkpoint's buckets",
                                        "first step of a resumed run"))
        elif compressing:
            fut = _compressed_bucket(state, comm, bucket.index(), grads, entries, key, order)
        else:
            fut = _uncompressed_bucket(state, comm, bucket.index(), grads, entries, key, order)
        if bucket.is_last():
            _end_of_backward(state, comm, compressing)
    return fut


def _uncompressed_bucket(state: "HookState", comm, index: int, grads: torch.Tensor, entries, key, order):
    """Warm-up steps and ``compress="none"``: summed as DDP lays the bucket out."""
    why = "compress='none'" if not state.spec().enabled else f"warm-up: step {state.step} < start_iter"
    state._summed_now.append((key, order))
    agree = _agreement(key, None, grads, False)
    if state.hands_uncompressed_to_group():
        state._routes.append(_route(index, entries, grads, "uncompressed, the process group's all-reduce", why))
        _agree_here(state, comm, agree)
        state.group_buckets += 1
        return _group_average(state, comm, grads)
    state._routes.append(_route(index, entries, grads, "uncompressed, fmcomm's all-reduce", why))
    first = _first_sight(state, agree)
    return _submit(state, comm, index, grads, lambda: _reduce(comm, grads, None, None, state, None,
                                                              agree if first else None))


def _agree_here(state: "HookState", comm, agree) -> None:
    """First sight of a bucket on the process group's path: every rank confirms it on
    fmcomm's own group, and this thread waits (once per bucket and setting), so that
    every all-reduce on the model's group leaves from this thread, in bucket order."""
    if _first_sight(state, agree):
        comm.run_async(functools.partial(_agree, comm, agree)).wait()


def _group_average(state: "HookState", comm, values: torch.Tensor):
    """The process group's own asynchronous all-reduce of ``values`` (one node,
    uncompressed, as PyTorch's allreduce_hook), scaled as DDP's own reducer scales a
    bucket (times 1/world, not divided by world): "none" on one node is then plain
    DDP, bit for bit. Returns a future of ``values``."""
    values.mul_(1.0 / comm.world)
    return dist.all_reduce(values, group=state.process_group, async_op=True).get_future().then(
        lambda f: f.value()[0])


def _compressed_bucket(state: "HookState", comm, index: int, grads: torch.Tensor, entries, key, order):
    coded = state._layouts.setdefault(key, order)
    slices = None
    if coded != order:
        # The same parameters in another order (DDP's rebuild): coded in the recorded
        # order, which the residuals and the chunks' owners follow.
        position = {i: r for r, i in enumerate(coded)}
        slices = sorted(entries, key=lambda e: position[e[0]])
    state._summed_now.append((key, list(coded)))
    target, spec, how, why = _route_of(state, comm, grads.numel() * grads.element_size())
    state._routes.append(_route(index, entries, grads, how, why))
    agree = _agreement(key, spec, grads, target is state._small)
    first = _first_sight(state, agree)
    return _submit(state, target, index, grads, lambda: _reduce(target, grads, slices, spec, state, key,
                                                                agree if first else None))


def _agreement(key: str, spec, values: torch.Tensor, small: bool) -> tuple:
    """What every rank confirms once per bucket and setting (see ``_agree``)."""
    return key, spec.text if spec is not None else "none", values.numel(), str(values.dtype), small


def _first_sight(state: "HookState", agree: tuple) -> bool:
    """Whether ``agree`` is new to this state (it is recorded as seen)."""
    if agree in state._agreed:
        return False
    state._agreed.add(agree)
    return True


def _route_of(state: "HookState", comm, nbytes: int):
    """(communicator, spec or None, how, why) for a compressing step's bucket of ``nbytes``."""
    if nbytes < state.compress_min_bytes:
        return (state.small_communicator(), None, "uncompressed, fmcomm's second communicator",
                f"below compress_min_bytes={state.compress_min_bytes}")
    spec = state.spec()
    if spec.level == "inter":
        comm.levels()  # made here, on every rank in bucket order: the worker cannot make groups
    return comm, spec, spec.text, ""


@dataclasses.dataclass(frozen=True)
class _Route:
    """How one bucket travels, as the log and summary() say it."""
    text: str
    nbytes: int
    compressed: bool


def _route(index: int, entries, grads: torch.Tensor, how: str, why: str) -> _Route:
    nbytes = grads.numel() * grads.element_size()
    text = (f"  bucket {index}: {len(entries)} parameters, {nbytes / 2**20:.2f} MiB {str(grads.dtype)[6:]}: "
            f"{how}" + (f" ({why})" if why else ""))
    return _Route(text, nbytes, not how.startswith("uncompressed"))  # held ones are coded at the end


def _submit(state: "HookState", comm, index, grads: torch.Tensor, fn):
    """Run ``fn`` on ``comm``'s worker; the returned future completes with ``grads``."""
    done, fut = _new_future()
    work = comm.run_async(functools.partial(_naming_bucket, index, fn))
    state._works.append(work)
    _complete(done, work, grads)
    return fut


def _naming_bucket(index, fn) -> None:
    """``fn()``, its fmcomm errors naming the bucket (type and fields kept)."""
    try:
        fn()
    except FmcommError as e:
        if e.args and isinstance(e.args[0], str) and "fmcomm.ddp" not in e.args[0]:
            e.args = (f"fmcomm.ddp bucket {index}: {e.args[0]}",) + e.args[1:]
        raise


def _end_of_backward(state: "HookState", comm, compressing: bool) -> None:
    """At the last bucket of a backward pass: the held buckets, the step's bookkeeping,
    and the wait that brings this step's errors to ``backward()``."""
    if state._positions is None:
        state._first_backward_done()
    if state._held:
        _regroup_held(state, comm, compressing)
    state._last_step = state._summed_now
    state._summed_now = []
    state._resume = None
    if compressing and state._route_text is None:
        _report_routes(state)
    if not compressing:
        state._warm_up_text = "\n".join(route.text for route in state._routes)
    state._routes = []
    works, state._works = state._works, []
    state.step += 1
    if works:
        _at_backward_end(functools.partial(_raise_at_backward_end, works))


def _regroup_held(state: "HookState", comm, compressing: bool) -> None:
    """Sum the held buckets' values as the checkpointed run's last step summed them.

    A resumed process's first step has DDP's buckets of before its rebuild, which
    group (and order) the parameters otherwise than the checkpointed step did; an
    all-reduce's rounding, the residuals and the chunks each rank owns all follow
    the old grouping. So each bucket of the checkpoint's last step not yet summed
    this step is gathered from the held buckets, averaged as that step averaged it
    (its key, its route), and scattered back.
    """
    held, state._held = state._held, []
    where = {pos: (h.grads, off, n) for h in held for pos, off, n in h.entries}
    done_keys = {k for k, _ in state._summed_now}
    targets = [(k, order) for k, order in state._resume.items() if k not in done_keys]
    if sorted(p for _, order in targets for p in order) != sorted(where):
        raise InvalidArgument(f"fmcomm.ddp: rank {comm.rank}: the checkpoint's buckets hold other parameters "
                              f"than this model's (was it made on another model?)")
    plans = []  # (key, parts, communicator, spec, agreement); routed here: a route may make a group
    for key, order in targets:
        parts = [where[p] for p in order]
        values = _gather(parts)
        if compressing:
            target, spec, _, _ = _route_of(state, comm, values.numel() * values.element_size())
            state._layouts.setdefault(key, list(order))
        else:
            target, spec = comm, None
        state._summed_now.append((key, list(order)))
        plans.append((key, parts, target, spec, _agreement(key, spec, values, target is state._small)))
    if not compressing and state.hands_uncompressed_to_group():
        # On the process group, from this thread, in the checkpoint's bucket order.
        futures, gathered = [], []
        for key, parts, _, _, agree in plans:
            _agree_here(state, comm, agree)
            values = _gather(parts)
            gathered.append((values, parts))
            futures.append(_group_average(state, comm, values))

        def scatter(f) -> None:
            for values, parts in gathered:
                _scatter(parts, values)
        finished = torch.futures.collect_all(futures).then(scatter)
        for h in held:
            finished.add_done_callback(functools.partial(_settle, h.done, h.grads))
        return
    work = comm.run_async(functools.partial(_naming_bucket, "of the resumed step", functools.partial(
        _average_regrouped, state, comm, plans)))
    state._works.append(work)
    for h in held:
        _complete(h.done, work, h.grads)


def _settle(done, grads: torch.Tensor, f) -> None:
    try:
        f.wait()
    except Exception as e:  # noqa: BLE001 - handed to DDP through the future
        done.set_exception(e)
        return
    done.set_result(grads)


def _average_regrouped(state: "HookState", comm, plans) -> None:
    for key, parts, target, spec, agree in plans:
        if _first_sight(state, agree):
            _agree(comm, agree)
        values = _gather(parts)
        _average(target, values, spec, state, key)
        _scatter(parts, values)


def _gather(parts) -> torch.Tensor:
    """The values of ``parts`` ((tensor, offset, count), in order) as one new tensor."""
    return torch.cat([t[o:o + n] for t, o, n in parts])


def _scatter(parts, values: torch.Tensor) -> None:
    """``_gather``'s inverse: ``values`` copied back into ``parts``."""
    at = 0
    for t, o, n in parts:
        t[o:o + n].copy_(values[at:at + n])
        at += n


def _raise_at_backward_end(works) -> None:
    """Wait for this backward's fmcomm work; its first error reaches ``backward()`` with its type."""
    for work in works:
        work.wait()


def _report_routes(state: "HookState") -> None:
    """Log once, at the first compressing step, how each bucket travels."""
    text = "\n".join(route.text for route in state._routes)
    state._route_text = text
    if state.communicator().rank != 0:
        return
    if not any(route.compressed for route in state._routes):
        log.warning("fmcomm.ddp: compress=%r compresses no bucket of this model: every bucket is below "
                    "compress_min_bytes=%d (largest %.2f MiB); pass compress_min_bytes=0 (or a smaller "
                    "bound) to compress them\n%s", state.compress, state.compress_min_bytes,
                    max((route.nbytes for route in state._routes), default=0) / 2**20, text)
    else:
        log.info("fmcomm.ddp: step %d, compress=%r: how each bucket travels\n%s", state.step, state.compress, text)



def _reduce(comm, grads: torch.Tensor, slices, spec, state: "HookState", key, agree) -> None:
    """Average ``grads`` (reordered into the coding layout by ``slices`` where given),
    first confirming ``agree`` with every rank where given."""
    if agree is not None:
        _agree(comm, agree)
    if slices is None:
        _average(comm, grads, spec, state, key)
        return
    parts = [(grads, o, n) for _, o, n in slices]
    values = _gather(parts)
    _average(comm, values, spec, state, key)
    _scatter(parts, values)


def _average(comm, t: torch.Tensor, spec, state: "HookState", key, async_op: bool = False):
    """The average of ``t`` over the ranks, compressed by ``spec`` (None: uncompressed)."""
    return comm.all_reduce(t, op="avg", compress=spec, state=state.error_feedback if spec is not None else None,
                           key=key if spec is not None else None, async_op=async_op)


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
             compress_min_bytes: int | None = None, max_error: float = DEFAULT_MAX_ERROR,
             state: "HookState | None" = None) -> HookState:
    """Register fmcomm's hook on ``ddp_model`` and return its state.

    ``state``: a state to go on with (unpickled, say) instead of a new one; the other
    settings are then its own. fmcomm's communicators are released when the model is
    collected or the interpreter exits, or earlier by ``state.close()``.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise InvalidArgument(f"fmcomm.ddp.register needs a DistributedDataParallel model, got "
                              f"{type(ddp_model).__name__}")
    group = process_group if process_group is not None else getattr(ddp_model, "process_group", None)
    if state is None:
        state = HookState(group, compress=compress, start_iter=start_iter, compress_min_bytes=compress_min_bytes,
                          max_error=max_error)
    elif not isinstance(state, HookState):
        raise InvalidArgument(f"fmcomm.ddp.register: state must be a HookState, got {type(state).__name__}")
    else:
        state.process_group = group
    ddp_model.register_comm_hook(state, hook)
    weakref.finalize(ddp_model, _close_quietly, state)
    return state
