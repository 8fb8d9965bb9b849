"""Training benchmark for fmcomm's DDP hook against PyTorch's own DDP communication.

    mpiexec -n 4 .venv/bin/python benchmarks/train.py [--steps 200] [--configs LIST]
        [--json FILE] [--plot FILE.png] [--seed 0] [--start-iter 10] ...
    python benchmarks/emulate.py --nodes 2 --per-node 2 --rate 1gbit --transport mpi -- \\
        .venv/bin/python benchmarks/train.py ...
    torchrun --nproc-per-node 4 benchmarks/train.py ...

Every rank runs this script. It starts torch.distributed (gloo) the way a user script
would: ``env://`` where MASTER_ADDR and RANK are set (torchrun, emulate.py); under
mpiexec without them, through ``fmcomm.transport.torch_dist.init_default_group`` with
MPI as the rendezvous. Then it trains the same model from the same initial weights for
the same number of steps once per config. By default (``--schedule interleaved``) every
config holds its own model and they take turns, ``--block`` steps (10) each: steps
0-9 of every config, then steps 10-19 of every config, and so on, so that a shared
machine whose speed drifts over minutes (measured here: compute alone took 97 ms per
step in one run and 149 ms an hour later) slows every config alike and the ratios
between them stay fair. (On the emulated cluster, turns of one step and of ten gave
the same ratios within noise, onebit@inter 1.72x and 1.76x; ten switch models less
often.) ``--schedule sequential`` trains one config after the other. The configs:

* ``torch-default``: DDP with no hook (PyTorch's built-in all-reduce);
* ``torch-allreduce`` (not in the default list): ``default_hooks.allreduce_hook``,
  PyTorch's own uncompressed all-reduce through the comm-hook path, which separates
  what registering any Python hook costs from what fmcomm's ``none`` costs;
* ``torch-fp16``: ``default_hooks.fp16_compress_hook``;
* ``torch-powersgd-rR``: ``powerSGD_hook`` with ``matrix_approximation_rank=R``. On
  gloo it deadlocked here as registered plain (its callbacks block gloo's two worker
  threads in further all-reduces once two buckets are in flight), so once it
  compresses, each bucket waits for the previous bucket's future before it starts;
* anything else is a ``compress`` of ``fmcomm.ddp.register`` (``none``, ``fp8@inter``,
  ``onebit@inter``, ``topk:0.01@inter``, ``auto``, ...).

Every compressing config (PyTorch's and fmcomm's) starts compressing at the same step,
``--start-iter``.

Model and data
--------------
A GPT-style byte-level language model (``benchmarks/train_model.py``) trained on the
Python standard library's own ``.py`` files: those under
``sysconfig.get_paths()["stdlib"]``, sorted by path, concatenated, cut at 8 MB; bytes
are the tokens (vocabulary 256), the last 5% is held out for the validation loss.
The data needs no download and is already on every machine the job runs on (ranks
compare a CRC of it and stop if they differ, e.g. different Python versions).

The model is sized to be communication-bound on a 1 Gbit link, as embedding-heavy
production models (recommenders, models with large vocabularies or hashed
feature tables) are: its input embedding is large and cheap, token + position +
fastText-style hashed n-gram features (the previous 2 and the previous 3 bytes, each
hashed into 2^15 buckets of dimension 128), while the transformer after it is small
(d_model 128, 2 layers, 4 heads, context 64) and the batch small (4 sequences of 64
bytes per rank). That is 8.86 M parameters, 35.4 MB of float32 gradients per step,
against ~75 ms of forward+backward+update for one rank alone on one thread here, and
110-135 ms per rank when 2-4 ranks share the 2 cores; a ring all-reduce of 35.4 MB
on 2 nodes x 2 ranks sends 53 MB out of each node, ~0.45 s at 1 Gbit.

Optimizer: SGD with momentum 0.9 (lr 0.1, gradient norm clipped at 1.0). Error
feedback, which fmcomm's ``onebit`` and ``topk`` and PowerSGD use, is analysed for SGD
and momentum, a linear function of the gradients, so what compression loses in one
step is delivered, through the residual, in a later one. Adam divides each value by a
running RMS of the *compressed* gradients it receives; with 1-bit coding every
embedding row, hit or not, receives +-scale each step, which inflates that RMS and
moves rows that had no gradient (the reason 1-bit Adam freezes Adam's variance
before it starts compressing). SGD keeps the comparison about communication, not about
an optimizer's interaction with a coder. lr 0.1 was the largest that stayed stable in
20-step trials at a global batch of 16 sequences (4 ranks x 4; 0.2 oscillated between
3.3 and 5.2): the loss fell from 5.57 (ln 256 = 5.55, uniform) to ~3.3 by step 20.

Measurements (per step; medians and means over the steps from max(--warmup,
--start-iter) on, where every compressing config compresses; with fewer steps, from
--warmup):

* step ms: from the start of the step (zero_grad) to the end of optimizer.step() on
  each rank, no barrier inside; the MAX over ranks is taken after the run;
* comm ms: from the first hook call of the step to the completion of its last
  future (each hook is wrapped to record both); ``-`` for torch-default, which has no
  hook;
* compute-only ms: the same steps (same batches, forward+backward+clip+update) on the
  plain module, no DDP, on all ranks at once: its first --compute-steps steps, taking
  its turn with the configs (interleaved) or before them (sequential);
  exposed = step ms - compute-only ms, overlap = 1 - exposed / comm;
* bytes/step sent per rank: fmcomm's counted ``executor.stats.wire_bytes`` (and
  ``inter_node_bytes``) deltas, plus, by formula, the buckets fmcomm hands to the
  engine's native all-reduce (where auto chooses it, uncompressed steps)
  which its executor does not count; for PyTorch's configs a formula: a ring
  all-reduce of S bytes sends 2(p-1)/p*S per rank (gloo's all-reduce is a ring), fp16
  halves S, PowerSGD all-reduces its P (n x r) and Q (m x r) matrices plus the tensors
  it leaves uncompressed (1-D ones, and any where (n + m) r * 2 >= n m). Inter-node
  bytes for PyTorch's configs: all of a rank's ring bytes if its ring successor is on
  another host, else 0 (also a formula);
* wall-clock s (the plot's x axis): the seconds this config has spent in its own
  steps so far (batch, then the step), the MAX over ranks; under either schedule it is
  the time that config alone would have taken;
* training loss every step (each rank's local loss, averaged over ranks) and the
  validation loss at the end (the same held-out windows on every rank; the spread
  over ranks shows whether replicas stayed identical).

Rank 0 prints a table, writes ``--json`` (every point and the summary rows) and
``--plot`` (loss against wall-clock time; needs matplotlib). An error on any rank
aborts the job (MPI_Abort under MPI, exit 1 otherwise) instead of leaving the others
waiting; waits are bounded by ``--timeout`` (torch.distributed) and FMCOMM_TIMEOUT.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import fmcomm.ddp  # noqa: E402
import fmcomm.optim  # noqa: E402
import fmcomm.dtypes  # noqa: E402
from fmcomm import compressed  # noqa: E402
from fmcomm.launch import detect  # noqa: E402
from train_model import Batches, CharGPT, load_corpus  # noqa: E402

ALL_CONFIGS = ["torch-default", "torch-fp16", "torch-powersgd-r1", "torch-powersgd-r4",
               "none", "fp8@inter", "onebit@inter", "topk:0.01@inter", "auto"]

_MPI = None  # mpi4py's MPI module where this job came up through it
# "momentum:<spec>": fmcomm.optim's OneBitSGD (or OneBitAdam with --optimizer adamw),
# whose momentum travels compressed by <spec> after --start-iter warm-up steps.
MOMENTUM = "momentum:"


# ------------------------------------------------------------------ arguments

def _check_config(name: str, start_iter: int) -> str | None:
    """None if ``name`` is a config, else why not."""
    if name.startswith(MOMENTUM):
        try:
            fmcomm.compression.parse(name[len(MOMENTUM):])
        except fmcomm.FmcommError as e:
            return str(e)
        return None
    if name in ("torch-default", "torch-allreduce", "torch-fp16"):
        return None
    if name.startswith("torch-powersgd-r"):
        r = name[len("torch-powersgd-r"):]
        if not r.isdigit() or int(r) < 1:
            return f"{name!r}: the rank after torch-powersgd-r must be a positive integer"
        if start_iter < 2:
            return "PowerSGD (with error feedback and warm start) needs --start-iter >= 2"
        return None
    if name.startswith("torch-"):
        return f"unknown PyTorch config {name!r}; use torch-default, torch-allreduce, torch-fp16 or torch-powersgd-rR"
    try:
        fmcomm.ddp.HookState(None, compress=name, start_iter=start_iter)
    except fmcomm.FmcommError as e:
        return str(e)
    return None


def parse_configs(text: str, start_iter: int) -> list[str]:
    if text.strip().lower() == "all":
        return list(ALL_CONFIGS)
    out: list[str] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        # fmcomm specs may hold commas themselves (fp8:e4m3,block=256): glue a piece that
        # is no config on its own back onto the one before when that makes a config.
        if out and _check_config(tok, start_iter) and not _check_config(out[-1] + "," + tok, start_iter):
            out[-1] += "," + tok
            continue
        out.append(tok)
    bad = [(c, _check_config(c, start_iter)) for c in out]
    bad = [f"  {c}: {why}" for c, why in bad if why]
    if bad:
        raise SystemExit("train.py: bad --configs:\n" + "\n".join(bad))
    if len(set(out)) != len(out):
        raise SystemExit("train.py: --configs names a config twice")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="training steps per config (200)")
    ap.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved",
                    help="interleaved (default): every config takes --block steps in turn; "
                         "sequential: one config's steps after the other's")
    ap.add_argument("--block", type=int, default=10,
                    help="interleaved: steps a config runs before the next takes its turn (10)")
    ap.add_argument("--configs", default="all", help="comma list (default all: " + ",".join(ALL_CONFIGS) + ")")
    ap.add_argument("--json", help="write every point and the summary here (rank 0)")
    ap.add_argument("--plot", help="write loss against wall-clock time to this PNG (needs matplotlib)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-iter", type=int, default=10,
                    help="steps run uncompressed before any config compresses (10)")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing statistics (5)")
    ap.add_argument("--compute-steps", type=int, default=None,
                    help="steps of the compute-only pass (default min(steps, 40); 0 skips it)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step (4)")
    ap.add_argument("--ctx", type=int, default=64, help="context length (64)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hash-bits", type=int, default=15, help="log2 buckets of each hashed n-gram table (15)")
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                    help="sgd (default: momentum --momentum) or adamw (weight decay 0.01); the "
                         "momentum: configs take fmcomm.optim's OneBitSGD or OneBitAdam alike")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (SGD 0.1, AdamW 1e-3)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    ap.add_argument("--data-mb", type=float, default=8.0, help="MB of stdlib source to read (8)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="torch.distributed timeout in seconds (300); fmcomm's is FMCOMM_TIMEOUT")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.block < 1:
        ap.error("--block must be >= 1")
    if args.start_iter < 1:
        ap.error("--start-iter must be >= 1 (DDP rebuilds its buckets after the first step)")
    if args.compute_steps is None:
        args.compute_steps = min(args.steps, 40)
    if args.lr is None:
        args.lr = 0.1 if args.optimizer == "sgd" else 1e-3
    args.config_list = parse_configs(args.configs, args.start_iter)
    return args


# -------------------------------------------------------------- process group

def init_distributed(timeout_s: float):
    """(rank, world, how): torch.distributed's default group, started as a user script would."""
    global _MPI
    info = detect()
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
        how = "env://"
    elif info.under_mpi:
        from mpi4py import MPI
        _MPI = MPI
        from fmcomm.transport.torch_dist import init_default_group
        init_default_group(MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), timeout_s=timeout_s,
                           mpi_comm=MPI.COMM_WORLD)
        how = "mpi rendezvous"
    else:
        from fmcomm.transport.torch_dist import init_default_group
        init_default_group(info.rank, info.world, timeout_s=timeout_s)
        how = "single process" if info.world == 1 else "env://"
    return dist.get_rank(), dist.get_world_size(), how, info


def all_gather_obj(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------- comm accounting

def ring_bytes(nbytes: float, world: int) -> float:
    return 2.0 * (world - 1) / world * nbytes if world > 1 else 0.0


class CommRecorder:
    """Wraps a DDP hook: time of the step's first call, of its last future's completion, bytes."""

    def __init__(self, world: int, ring_inter: bool):
        self.world, self.ring_inter = world, ring_inter
        self.reset()

    def reset(self) -> None:
        self.first = None
        self.last = None
        self.formula_bytes = 0.0   # bytes this rank sent by formula this step
        self.formula_inter = 0.0

    def add_ring(self, nbytes: float, inter: bool) -> None:
        b = ring_bytes(nbytes, self.world)
        self.formula_bytes += b
        if inter:
            self.formula_inter += b

    def wrap(self, inner, before=None, after=None, serialize=None):
        """``inner`` with timing; ``serialize(state)`` true: wait for the previous bucket first."""
        prev = []

        def hook(state, bucket):
            t = time.perf_counter()
            if self.first is None:
                self.first = t
            if serialize is not None and prev and serialize(state):
                prev[0].wait()
            ctx = before(state, bucket) if before is not None else None
            fut = inner(state, bucket)
            if after is not None:
                after(state, bucket, ctx)

            def done(f):
                now = time.perf_counter()
                if self.last is None or now > self.last:
                    self.last = now
                return f.value()  # re-raises a failed bucket's error into DDP
            out = fut.then(done)
            prev[:] = [out]
            return out
        return hook


def powersgd_formula(state, bucket, world: int) -> float:
    """Bytes one rank sends for this bucket under powerSGD_hook (ring all-reduces)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress
    buf = bucket.buffer()
    isz = buf.element_size()
    if state.iter < state.start_powerSGD_iter:
        return ring_bytes(buf.numel() * isz, world)
    unc = ps = qs = 0
    for g in bucket.gradients():
        n = g.shape[0] if g.dim() else 1
        m = g.numel() // max(n, 1)
        r = min(n, m, state.matrix_approximation_rank)
        if _should_compress(n, m, r, state.min_compression_rate)[0]:
            ps += n * r
            qs += m * r
        else:
            unc += g.numel()
    # three all-reduces: the uncompressed tensors, then all Ps, then all Qs
    return sum(ring_bytes(k * isz, world) for k in (unc, ps, qs))


# --------------------------------------------------------------------- configs

class Run:
    """One config's model, optimizer and what its step needs for accounting."""

    def __init__(self, name: str, args, world: int, ring_inter: bool):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        self.name, self.world = name, world
        reset_seeds(args.seed)
        net = build_model(args)
        self.model = DDP(net)
        self.optimizer = make_optimizer(net, args)
        self.rec = CommRecorder(world, ring_inter)
        self.state = None  # fmcomm HookState
        self.bytes_source = "formula"
        self.nparams_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        self.resolved = name
        # Per step: loss, step and comm seconds, bytes sent and inter-node; this config's
        # own seconds so far (its wall clock, under either schedule); compressed phases.
        self.losses, self.step_s, self.comm_s, self.sent, self.inter, self.wall = [], [], [], [], [], []
        self.busy_s = 0.0
        self.phases: dict = {}
        rec = self.rec
        if name == "torch-default":
            self.hooked = False
        elif name == "torch-allreduce":
            self.hooked = True
            self.model.register_comm_hook(dist.group.WORLD, rec.wrap(
                default_hooks.allreduce_hook, before=lambda st, b: rec.add_ring(b.buffer().numel() * 4, ring_inter)))
        elif name == "torch-fp16":
            self.hooked = True
            self.model.register_comm_hook(None, rec.wrap(
                default_hooks.fp16_compress_hook,
                before=lambda st, b: rec.add_ring(b.buffer().numel() * 2, ring_inter)))
        elif name.startswith(MOMENTUM):
            self.hooked = True
            self.bytes_source = "counted"
            model = self.model
            # In the warm-up the optimizer's hook averages gradients uncompressed: counted
            # by formula, as PyTorch's default (on one node they go to the process group).
            model.register_comm_hook = lambda st, h: DDP.register_comm_hook(model, st, rec.wrap(
                h, before=lambda s, b: rec.add_ring(b.buffer().numel() * b.buffer().element_size(), ring_inter)
                if s.warming_up else None))
            try:
                self.optimizer = make_optimizer(net, args, ddp_model=model, compress=name[len(MOMENTUM):])
            finally:
                del model.register_comm_hook
        elif name.startswith("torch-powersgd-r"):
            self.hooked = True
            st = powerSGD_hook.PowerSGDState(process_group=None,
                                             matrix_approximation_rank=int(name[len("torch-powersgd-r"):]),
                                             start_powerSGD_iter=args.start_iter)

            def before(s, b):
                b_ = powersgd_formula(s, b, world)
                rec.formula_bytes += b_
                if ring_inter:
                    rec.formula_inter += b_
            # powerSGD_hook's callbacks run on gloo's worker threads (2 per process group) and
            # block there in further all-reduces (P, then Q): with two buckets in flight both
            # threads block and the job deadlocks (seen here), and the order in which buckets
            # issue their P/Q all-reduces can differ between ranks. So once PowerSGD is on,
            # a bucket starts only after the previous one finished (on NCCL no such wait).
            self.model.register_comm_hook(st, rec.wrap(
                powerSGD_hook.powerSGD_hook, before=before,
                serialize=lambda s: s.iter >= s.start_powerSGD_iter))
        else:
            self.hooked = True
            self.bytes_source = "counted"
            self._ring_inter = ring_inter
            # The public call, as a user makes it; the hook it registers is wrapped on the way
            # in (DDP takes one hook per model, so it cannot be wrapped afterwards).
            model = self.model
            model.register_comm_hook = lambda st, h: DDP.register_comm_hook(
                model, st, rec.wrap(h, before=self._fm_before, after=self._fm_after))
            try:
                self.state = fmcomm.ddp.register(model, compress=name, start_iter=args.start_iter)
            finally:
                del model.register_comm_hook

    # fmcomm: buckets sent uncompressed (before start_iter, or below the hook's
    # compress_min_bytes) for which auto chooses the engine's all-reduce, which the
    # executor does not count: add them by formula.
    # And those the hook hands to the process group itself (one node, uncompressed).
    def _fm_before(self, state, bucket):
        return state.step, state.group_buckets  # the hook advances the step at the last bucket

    def _fm_after(self, state, bucket, before):
        step_before, group_before = before
        nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
        if state.group_buckets != group_before:
            self.rec.add_ring(nbytes, self._ring_inter)
            return
        uncompressed = (step_before < state.start_iter or not state.spec().enabled
                        or nbytes < state.compress_min_bytes)
        if not uncompressed:
            return
        comm, buf = state.communicator(), bucket.buffer()
        request = comm.request("all_reduce", nbytes, fmcomm.dtypes.dtype_of(buf.dtype), "sum", buf.device.type)
        if nbytes and comm.planner.choose(request).algorithm == "native":
            self.rec.add_ring(nbytes, self._ring_inter)

    def counted(self) -> tuple[int, int]:
        if isinstance(self.optimizer, (fmcomm.optim.OneBitSGD, fmcomm.optim.OneBitAdam)):
            if self.optimizer._comm is None:
                return 0, 0
            s = self.optimizer._comm.executor.stats
            return s.wire_bytes, s.inter_node_bytes
        if self.state is None or self.state._comm is None:
            return 0, 0
        s = self.state.communicator().executor.stats
        return s.wire_bytes, s.inter_node_bytes

    def close(self) -> None:
        if isinstance(self.optimizer, (fmcomm.optim.OneBitSGD, fmcomm.optim.OneBitAdam)):
            self.optimizer.close()
        if self.state is not None:
            self.resolved = self.state.spec().text if self.state.compress == "auto" else self.name
            for comm in (self.state._small, self.state._comm):  # the second communicator first
                if comm is not None:
                    comm.close()


def reset_seeds(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def build_model(args) -> CharGPT:
    return CharGPT(d=args.d_model, layers=args.layers, heads=args.heads, ctx=args.ctx, bits=args.hash_bits)


def make_optimizer(net, args, ddp_model=None, compress=None):
    """PyTorch's SGD or AdamW; with ``compress``, fmcomm.optim's counterpart on ``ddp_model``."""
    if compress is None:
        if args.optimizer == "adamw":
            return torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
        return torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    if args.optimizer == "adamw":
        return fmcomm.optim.OneBitAdam(ddp_model, lr=args.lr, weight_decay=0.01, warmup_steps=args.start_iter,
                                       compress=compress)
    return fmcomm.optim.OneBitSGD(ddp_model, lr=args.lr, momentum=args.momentum, warmup_steps=args.start_iter,
                                  compress=compress)


def train_step(model, net, optimizer, x, y, clip: float) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = CharGPT.loss(model(x), y)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    optimizer.step()
    return loss.detach()


def evaluate(net, batches) -> float:
    net.eval()
    with torch.no_grad():
        losses = [CharGPT.loss(net(x), y).item() for x, y in batches.val_batches()]
    net.train()
    return sum(losses) / len(losses)


# ------------------------------------------------------------------ one run

def reduce_series(values: list[float], op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def window_start(args, steps: int, compressing: bool = True) -> int:
    first = max(args.warmup, args.start_iter) if compressing else args.warmup
    if steps - first >= 3:
        return first
    return min(args.warmup, steps - 1) if steps - args.warmup >= 1 else 0


class ComputeOnly:
    """The plain module, no DDP: the same batches, forward+backward+clip+update."""

    def __init__(self, args):
        reset_seeds(args.seed)
        self.net = build_model(args)
        self.optimizer = make_optimizer(self.net, args)
        self.times: list[float] = []

    def step(self, step: int, batches, args) -> None:
        x, y = batches.train_batch(step)
        t0 = time.perf_counter()
        train_step(self.net, self.net, self.optimizer, x, y, args.clip)
        self.times.append(time.perf_counter() - t0)

    def finish(self, args) -> dict:
        times = reduce_series(self.times, dist.ReduceOp.MAX)
        n = len(times)
        w = window_start(args, n, compressing=False)
        ms = [t * 1e3 for t in times[w:]]
        del self.net, self.optimizer
        gc.collect()
        return {"steps": n, "window_from": w, "step_ms_median": statistics.median(ms),
                "step_ms_mean": statistics.fmean(ms), "step_ms": [t * 1e3 for t in times]}


def run_step(run: Run, step: int, w: int, batches, args, world: int, ring_inter: bool) -> None:
    """One training step of ``run``, its times, loss and bytes appended to its series."""
    net = run.model.module
    # The compressed all-reduce's phases, over the timed window, into this run's own
    # dict: every bucket has finished when the step returns (DDP waits for them).
    compressed.phase_seconds = run.phases if (step >= w and run.state is not None) else None
    t_fetch = time.perf_counter()
    x, y = batches.train_batch(step)
    run.rec.reset()
    w0, i0 = run.counted()
    t0 = time.perf_counter()
    loss = train_step(run.model, net, run.optimizer, x, y, args.clip)
    t1 = time.perf_counter()
    compressed.phase_seconds = None
    w1, i1 = run.counted()
    run.step_s.append(t1 - t0)
    run.busy_s += t1 - t_fetch
    run.wall.append(run.busy_s)
    run.losses.append(float(loss))
    if run.hooked and run.rec.first is not None and run.rec.last is not None:
        run.comm_s.append(run.rec.last - run.rec.first)
    else:
        run.comm_s.append(-1.0)
    if run.name == "torch-default":
        b = ring_bytes(run.nparams_bytes, world)
        run.sent.append(b)
        run.inter.append(b if ring_inter else 0.0)
    else:
        run.sent.append((w1 - w0) + run.rec.formula_bytes)
        run.inter.append((i1 - i0) + run.rec.formula_inter)


def finish_run(run: Run, w: int, args, batches, world: int) -> tuple[list[dict], dict]:
    """Validation loss, then every rank's series reduced into points and a summary row."""
    name, net = run.name, run.model.module
    val = evaluate(net, batches)
    run.close()
    dist.barrier()

    loss_avg = [v / world for v in reduce_series(run.losses, dist.ReduceOp.SUM)]
    step_max = reduce_series(run.step_s, dist.ReduceOp.MAX)
    comm_max = reduce_series(run.comm_s, dist.ReduceOp.MAX)
    sent_avg = [v / world for v in reduce_series(run.sent, dist.ReduceOp.SUM)]
    inter_avg = [v / world for v in reduce_series(run.inter, dist.ReduceOp.SUM)]
    wall_max = reduce_series(run.wall, dist.ReduceOp.MAX)
    vmax = reduce_series([val], dist.ReduceOp.MAX)[0]
    vmin = reduce_series([val], dist.ReduceOp.MIN)[0]

    points = [{"config": name, "step": s, "wall_clock_s": wall_max[s], "loss": loss_avg[s],
               "step_ms": step_max[s] * 1e3, "comm_ms": comm_max[s] * 1e3 if comm_max[s] >= 0 else None,
               "bytes": sent_avg[s], "inter_node_bytes": inter_avg[s]} for s in range(args.steps)]
    names = sorted(set().union(*all_gather_obj(sorted(run.phases))))
    slowest = reduce_series([run.phases.get(k, 0.0) for k in names], dist.ReduceOp.MAX)
    phase_ms = {k: v * 1e3 / (args.steps - w) for k, v in zip(names, slowest)}
    ms = [step_max[s] * 1e3 for s in range(w, args.steps)]
    cm = [comm_max[s] * 1e3 for s in range(w, args.steps) if comm_max[s] >= 0]
    summary = {
        "config": name, "resolved": run.resolved, "steps": args.steps, "window_from": w,
        "train_loss": statistics.fmean(loss_avg[-10:]), "val_loss": val, "val_loss_spread": vmax - vmin,
        "step_ms_median": statistics.median(ms), "step_ms_mean": statistics.fmean(ms),
        "comm_ms_median": statistics.median(cm) if cm else None,
        "comm_ms_mean": statistics.fmean(cm) if cm else None,
        "bytes_per_step": statistics.fmean(sent_avg[w:]), "inter_node_bytes_per_step": statistics.fmean(inter_avg[w:]),
        "bytes_source": run.bytes_source, "total_s": wall_max[-1],
        "phase_ms_per_step": phase_ms,
    }
    del run.model, run.optimizer, net
    gc.collect()
    return points, summary


def report_row(row: dict) -> None:
    print(f"  {row['config']}: {row['step_ms_median']:.1f} ms/step, train loss {row['train_loss']:.3f}, "
          f"val {row['val_loss']:.3f}, {row['total_s']:.1f} s", flush=True)


def report_compute(compute: dict) -> None:
    print(f"  compute only: {compute['step_ms_median']:.1f} ms/step (median of slowest rank)", flush=True)


def train_configs(args, batches, world: int, ring_inter: bool, rank: int) -> tuple[dict | None, list, list]:
    """(compute-only, points, rows) of every config, in the order of ``--schedule``."""
    w = window_start(args, args.steps)
    points, rows, compute = [], [], None

    def finish(run):
        pts, row = finish_run(run, w, args, batches, world)
        points.extend(pts)
        rows.append(row)
        if rank == 0:
            report_row(row)

    if args.schedule == "sequential":
        if args.compute_steps > 0:
            only = ComputeOnly(args)
            dist.barrier()
            for step in range(args.compute_steps):
                only.step(step, batches, args)
            dist.barrier()
            compute = only.finish(args)
            if rank == 0:
                report_compute(compute)
        for name in args.config_list:
            dist.barrier()
            run = Run(name, args, world, ring_inter)
            dist.barrier()
            for step in range(args.steps):
                run_step(run, step, w, batches, args, world, ring_inter)
            finish(run)
        return compute, points, rows
    only = ComputeOnly(args) if args.compute_steps > 0 else None
    runs = [Run(name, args, world, ring_inter) for name in args.config_list]
    dist.barrier()
    for first in range(0, args.steps, args.block):
        steps = range(first, min(first + args.block, args.steps))
        if only is not None:
            for step in steps:
                if step < args.compute_steps:
                    only.step(step, batches, args)
        for run in runs:
            for step in steps:
                run_step(run, step, w, batches, args, world, ring_inter)
    dist.barrier()
    if only is not None:
        compute = only.finish(args)
        if rank == 0:
            report_compute(compute)
    for run in runs:
        finish(run)
    return compute, points, rows


# ------------------------------------------------------------------ output

def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b:.0f} B"


def finish_summary(rows: list[dict], compute: dict | None) -> None:
    base = next((r for r in rows if r["config"] == "torch-default"), None)
    for r in rows:
        r["speedup_vs_torch_default"] = base["step_ms_median"] / r["step_ms_median"] if base else None
        if compute:
            exposed = r["step_ms_median"] - compute["step_ms_median"]
            r["exposed_comm_ms"] = exposed
            r["overlap"] = 1.0 - exposed / r["comm_ms_median"] if r["comm_ms_median"] else None
        else:
            r["exposed_comm_ms"] = r["overlap"] = None


def print_table(rows: list[dict], compute: dict | None, meta: dict) -> None:
    print(f"\nworld {meta['world']} ({meta['nodes']} node(s): {', '.join(meta['hosts_unique'])}), "
          f"{meta['threads']} thread(s)/rank, {meta['params'] / 1e6:.2f} M params "
          f"({fmt_bytes(meta['grad_bytes'])} of gradients), {meta['steps']} steps/config, "
          f"compressing from step {meta['start_iter']}")
    if compute:
        print(f"compute only (forward+backward+update, no DDP, all ranks at once): "
              f"{compute['step_ms_median']:.1f} ms/step median, {compute['step_ms_mean']:.1f} mean")
    hdr = ["config", "steps", "train loss", "val loss", "ms/step", "(mean)", "comm ms", "exposed", "overlap",
           "bytes/step", "inter-node", "speedup"]
    lines = []
    for r in rows:
        name = r["config"] + (f" ({r['resolved']})" if r["resolved"] != r["config"] else "")
        bsrc = "" if r["bytes_source"] == "counted" else "*"
        lines.append([
            name, str(r["steps"]), f"{r['train_loss']:.3f}", f"{r['val_loss']:.3f}",
            f"{r['step_ms_median']:.1f}", f"{r['step_ms_mean']:.1f}",
            f"{r['comm_ms_median']:.1f}" if r["comm_ms_median"] is not None else "-",
            f"{r['exposed_comm_ms']:.1f}" if r["exposed_comm_ms"] is not None else "-",
            f"{r['overlap']:.2f}" if r["overlap"] is not None else "-",
            fmt_bytes(r["bytes_per_step"]) + bsrc, fmt_bytes(r["inter_node_bytes_per_step"]) + bsrc,
            f"{r['speedup_vs_torch_default']:.2f}x" if r["speedup_vs_torch_default"] else "-"])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(hdr))
    print("  ".join("-" * w for w in widths))
    for l in lines:
        print(fmt(l))
    w = rows[0]["window_from"] if rows else 0
    print(f"ms/step: median (and mean) over steps {w}..{meta['steps'] - 1} of the slowest rank; comm: first hook "
          f"call to last bucket done; exposed = ms/step - compute only; overlap = 1 - exposed/comm; "
          f"bytes sent per rank per step (* = formula; fmcomm's counted by its executor, plus by formula the "
          f"buckets it leaves to the engine's all-reduce); train loss = mean of the last "
          f"10 steps; speedup = torch-default ms/step / ms/step", flush=True)
    timed = [r for r in rows if r.get("phase_ms_per_step")]
    if timed:
        print("compressed all-reduce phases, ms per step (slowest rank each, summed over the step's buckets; "
              "lane phases nest inside the intra-node ones' call):")
        for r in timed:
            print(f"  {r['config']:>22}: " + "  ".join(f"{k} {v:.1f}" for k, v in r["phase_ms_per_step"].items()))


def write_plot(path: str, points: list[dict], rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); skipping the plot",
              flush=True)
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        pts = [p for p in points if p["config"] == r["config"]]
        xs = [p["wall_clock_s"] for p in pts]
        ema, ys = 0.0, []
        for i, p in enumerate(pts):  # bias-corrected, so the first steps are not pinned to step 0
            ema = 0.9 * ema + 0.1 * p["loss"]
            ys.append(ema / (1.0 - 0.9 ** (i + 1)))
        line, = ax.plot(xs, ys, label=f"{r['config']} (val {r['val_loss']:.3f})", linewidth=1.4)
        ax.scatter([xs[-1]], [r["val_loss"]], color=line.get_color(), marker="o", s=18)
    ax.set_xlabel("wall-clock time in the config's own steps (s)")
    ax.set_ylabel("training loss (nats/byte, EMA 0.9); dot: validation loss")
    ax.set_title("fmcomm DDP hook vs PyTorch: loss against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", flush=True)


# -------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, how, info = init_distributed(args.timeout)
    hosts = all_gather_obj(socket.gethostname())
    local = info.local_world or hosts.count(hosts[rank])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, local))
    torch.set_num_threads(threads)
    ring_inter = hosts[(rank + 1) % world] != hosts[rank]  # gloo's ring: rank r sends to r + 1
    nodes = len(set(hosts))

    train, val, data_info = load_corpus(int(args.data_mb * (1 << 20)))
    crcs = all_gather_obj(data_info["crc32"])
    if len(set(crcs)) != 1:
        raise RuntimeError(f"ranks read different stdlib sources (CRC-32 by rank: {crcs}); run every rank on "
                           f"the same Python version")
    batches = Batches(train, val, args.ctx, args.batch, args.seed, rank, world)
    reset_seeds(args.seed)
    probe = build_model(args)
    params = sum(p.numel() for p in probe.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    del probe
    meta = {"world": world, "hosts": hosts, "hosts_unique": sorted(set(hosts)), "nodes": nodes,
            "threads": threads, "init": how, "launcher": info.launcher, "params": params,
            "grad_bytes": grad_bytes, "steps": args.steps, "start_iter": args.start_iter,
            "data": data_info, "torch": torch.__version__,
            "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "ctx": args.ctx,
                      "hash_bits": args.hash_bits, "batch_per_rank": args.batch},
            "optimizer": {"name": args.optimizer, "lr": args.lr, "momentum": args.momentum, "clip": args.clip},
            "args": {k: v for k, v in vars(args).items() if k != "config_list"}}
    if rank == 0:
        print(f"train.py: {world} ranks ({how}; {nodes} node(s)), {threads} thread(s)/rank; "
              f"{params:,} params; data {data_info['bytes']:,} bytes from {data_info['files']} files of "
              f"{data_info['stdlib']} (crc {data_info['crc32']}); configs: {', '.join(args.config_list)}",
              flush=True)

    compute, points, rows = train_configs(args, batches, world, ring_inter, rank)
    finish_summary(rows, compute)
    if rank == 0:
        print_table(rows, compute, meta)
        if args.json:
            doc = {"meta": meta, "compute_only": compute, "points": points, "summary": rows}
            Path(args.json).write_text(json.dumps(doc, indent=1))
            print(f"wrote {args.json}", flush=True)
        if args.plot:
            write_plot(args.plot, points, rows)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - any rank's failure must end the job, not hang it
        r = os.environ.get("RANK") or os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
        sys.stderr.write(f"train.py rank {r}: failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        if _MPI is not None:
            _MPI.COMM_WORLD.Abort(1)
        os._exit(1)
    sys.exit(code)
