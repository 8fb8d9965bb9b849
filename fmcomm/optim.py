"""Optimizers that communicate compressed momentum instead of gradients, for DDP models.

A gradient compressor with error feedback (the DDP hook's ``onebit``, ``topk``)
delivers what it holds back steps later, and an optimizer's momentum multiplies that
lag: on the training benchmark gradient ``onebit`` ends several percent above the
uncompressed loss. The published remedy (DeepSpeed's 1-bit Adam, DGC's momentum
correction, dist-EF-SGDM) compresses the momentum instead. These optimizers do so:

1. Warm-up (the first ``warmup_steps`` steps): DDP averages gradients uncompressed
   (fmcomm's hook with ``compress="none"``: on one node plain DDP bit for bit) and the
   optimizer is its PyTorch counterpart, ``torch.optim.AdamW`` or ``torch.optim.SGD``.
2. After it, DDP's gradient all-reduce is switched off (the hook hands each bucket
   back as it is). Each rank folds its own gradient into its own momentum; the
   momenta travel in one flat buffer through fmcomm's compressed all-reduce (any
   compressor, ``@inter`` included) with error feedback, and every rank applies the
   same decoded average. Momentum is linear in the gradients, so the average of the
   ranks' momenta is the momentum of the averaged gradients: uncompressed, this is
   the PyTorch optimizer again, within float32 rounding.

Adam's variance cannot be rebuilt from compressed momentum, so it is frozen at the end
of the warm-up (``freeze_variance=True``), as 1-bit Adam freezes it. With
``freeze_variance=False`` it goes on following the average gradient recovered from
the exchanged momentum, (m_t - beta1 m_{t-1}) / (1 - beta1): exact uncompressed, noisy
compressed.

Example::

    model = DDP(net)
    opt = fmcomm.optim.OneBitAdam(model, lr=1e-3, warmup_steps=100, compress="onebit@inter")
    for x, y in data:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
"""
import logging
import math
from typing import Any

import torch

from . import compression
from .compression import ErrorFeedback
from .errors import InvalidArgument

log = logging.getLogger("fmcomm.optim")

# Version of the "fmcomm" part of the optimizers' state_dict; a newer one is refused.
STATE_FORMAT = 1
_KEY = "momentum"  # the error-feedback key of the flat momentum buffer


class _MomentumExchange(torch.optim.Optimizer):
    """What both optimizers share: the hook, the warm-up switch, the exchange of momenta.

    Subclasses define ``_warm_up_update`` (the PyTorch optimizer's step on averaged
    gradients), ``_initial_momentum`` (where each rank's own momentum starts),
    ``_fold`` (this rank's gradient into its momentum, and into ``send`` what it
    sends, where that is another buffer) and ``_apply`` (the update from the averaged momentum).
    Momenta live in flat float32 buffers (``_local``, ``_send``, ``_avg``), so the
    exchange is one call and no copy per step.
    """

    def __init__(self, ddp_model, defaults: dict, *, warmup_steps: int, compress: str,
                 compress_min_bytes: int):
        from . import ddp as fmcomm_ddp
        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise InvalidArgument(f"{type(self).__name__} needs a DistributedDataParallel model, got "
                                  f"{type(ddp_model).__name__}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise InvalidArgument(f"warmup_steps must be an integer >= 1 (the momentum must start from "
                                  f"averaged gradients), got {warmup_steps!r}")
        if isinstance(compress_min_bytes, bool) or not isinstance(compress_min_bytes, int) or compress_min_bytes < 0:
            raise InvalidArgument(f"compress_min_bytes must be an integer >= 0, got {compress_min_bytes!r}")
        self.spec = compression.parse(compress)  # InvalidArgument naming an unknown compressor
        super().__init__([p for p in ddp_model.parameters() if p.requires_grad], defaults)
        self.warmup_steps = warmup_steps
        self.compress_min_bytes = compress_min_bytes
        self.steps_taken = 0  # optimizer steps, skipped ones included
        self.skipped_steps = 0  # steps whose gradients held NaN or infinity on some rank
        self.error_feedback = ErrorFeedback()
        self._group = getattr(ddp_model, "process_group", None)
        self._comm = None
        self._flat = None  # the flat buffers' layout (see _layout), made on the first exchange step
        self._hook_state = fmcomm_ddp.HookState(self._group, compress="none", start_iter=0)
        try:
            ddp_model.register_comm_hook(self, _hook)
        except RuntimeError as e:  # DDP allows one hook per model
            raise InvalidArgument(f"{type(self).__name__}: the model already has a communication hook; "
                                  f"the optimizer installs its own ({e})") from e

    @property
    def warming_up(self) -> bool:
        return self.steps_taken < self.warmup_steps

    def communicator(self):
        """fmcomm's communicator for the momenta, on a group of its own over the model's ranks."""
        if self._comm is None:
            from . import ddp as fmcomm_ddp
            self._comm = fmcomm_ddp.private_communicator(self._group, "optim")
            fmcomm_ddp._LIVE.add(self)  # closed at exit with the hook states
        return self._comm

    def close(self) -> None:
        """Release fmcomm's communicators (the hook's and the momenta's)."""
        self._hook_state.close()
        if self._comm is not None:
            self._comm.close()
            self._comm = None

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.warming_up:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._warm_up_update(p, group)
                        # Parameters whose averaged gradient stayed exactly zero all warm-up
                        # (no input reaches them yet) are masked after it, until one does.
                        state = self.state[p]
                        reached = bool(p.grad.ne(0).any())
                        state["nonzero"] = torch.tensor(bool(state.get("nonzero", False)) or reached)
            self.steps_taken += 1
            return loss
        self._exchange_step()
        self.steps_taken += 1
        return loss

    def _layout(self) -> list:
        """(parameter, group, offset, count) of every parameter in the flat buffers, made on
        the first exchange step (and after a load): the compressed ones first, then those
        below ``compress_min_bytes``. Each parameter's ``state["local"]`` (its momentum of
        this rank's gradients) becomes a view of ``self._local``."""
        if self._flat is not None:
            return self._flat
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        big = [(p, g) for p, g in params if p.numel() * 4 >= self.compress_min_bytes]
        small = [(p, g) for p, g in params if p.numel() * 4 < self.compress_min_bytes]
        total = sum(p.numel() for p, _ in params)
        device = params[0][0].device if params else torch.device("cpu")
        self._local = torch.zeros(total, dtype=torch.float32, device=device)
        self._send = torch.zeros_like(self._local) if self._sends_direction() else self._local
        self._avg = torch.zeros_like(self._local)
        self._split = sum(p.numel() for p, _ in big)  # elements compressed, from the start
        layout, at = [], 0
        for p, g in big + small:
            state = self._end_warm_up_state(p)
            view = self._local[at:at + p.numel()].view_as(p)
            view.copy_(state["local"] if "local" in state else self._initial_momentum(p, state))
            state["local"] = view
            layout.append((p, g, at, p.numel()))
            at += p.numel()
        self._flat = layout
        return layout

    def _sends_direction(self) -> bool:
        return False

    def _exchange_step(self) -> None:
        comm = self.communicator()
        layout = self._layout()
        # One small agreement: whether any rank's gradient is non-finite (slot 0), and
        # which masked parameters some rank's gradient now reaches (the rest).
        masked = [i for i, (p, _, _, _) in enumerate(layout) if self.state[p].get("masked", False)]
        flags = torch.zeros(1 + len(masked), dtype=torch.int32)
        flags[0] = int(any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p, _, _, _ in layout))
        for j, i in enumerate(masked):
            g = layout[i][0].grad
            flags[1 + j] = int(g is not None and bool(g.ne(0).any()))
        comm.all_reduce(flags, op="max")
        if flags[0]:
            # Some rank's gradient held NaN or infinity: nobody's state moves this step.
            self.skipped_steps += 1
            log.warning("fmcomm.optim: step %d skipped: a gradient held NaN or infinity on some rank "
                        "(momenta and parameters unchanged)", self.steps_taken)
            return
        for j, i in enumerate(masked):
            if flags[1 + j]:
                self.state[layout[i][0]]["masked"] = False  # reached at last: it travels from now on
        for p, group, at, n in layout:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            self._fold(p, group, g, self._send[at:at + n].view_as(p))
        for lo, hi, spec in ((0, self._split, self.spec), (self._split, self._local.numel(), None)):
            if hi > lo:
                coded = spec is not None and spec.enabled
                comm.all_reduce(self._send[lo:hi], output=self._avg[lo:hi], op="avg",
                                compress=spec if coded else None, state=self.error_feedback if coded else None,
                                key=_KEY if coded else None)
        for p, group, at, n in layout:
            state = self.state[p]
            avg = self._avg[at:at + n].view_as(p)
            if state.get("masked", False):
                state["local"].zero_()
                continue  # no gradient reached it anywhere: nothing to apply
            self._apply(p, group, avg.to(p.dtype) if avg.dtype != p.dtype else avg)

    def _end_warm_up_state(self, p) -> dict:
        """The per-parameter state the exchange starts from: under a compressor that
        cannot carry a zero (1-bit), a parameter no rank's gradient reached in the whole
        warm-up is masked (it would be set moving) until one does."""
        state = self.state[p]
        seen = state.pop("nonzero", None)
        if seen is not None and self.spec.enabled and not self.spec.compressor.carries_zero:
            state["masked"] = not bool(seen.bool().any())
        return state

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fmcomm"] = {"format": STATE_FORMAT, "steps_taken": self.steps_taken, "skipped_steps": self.skipped_steps,
                        "error_feedback": self.error_feedback.state_dict(), "hook": self._hook_state.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("fmcomm", None)
        if not isinstance(ours, dict):
            raise InvalidArgument(f"{type(self).__name__}.load_state_dict: the checkpoint lacks its 'fmcomm' part "
                                  f"(was it made by another optimizer?)")
        if int(ours.get("format", 0)) > STATE_FORMAT:
            raise InvalidArgument(f"{type(self).__name__}.load_state_dict: checkpoint format {ours['format']} is "
                                  f"newer than this fmcomm reads ({STATE_FORMAT})")
        super().load_state_dict(state_dict)
        self.steps_taken = int(ours["steps_taken"])
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        self.error_feedback.load_state_dict(ours["error_feedback"])
        self._flat = None  # rebuilt from the loaded momenta at the next exchange step
        self._hook_state.load_state_dict(ours["hook"])


def _hook(opt: "_MomentumExchange", bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's communication: averaged uncompressed in the warm-up, none after it."""
    from . import ddp as fmcomm_ddp
    if opt.warming_up:
        return fmcomm_ddp.hook(opt._hook_state, bucket)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())  # this rank's own gradient: its momentum travels in step()
    return fut


class OneBitAdam(_MomentumExchange):
    """AdamW (decoupled weight decay) whose momentum travels compressed after a warm-up.

    ``warmup_steps`` (default 100; DeepSpeed advises 15-25% of a run, PowerSGD 10%):
    plain AdamW on averaged gradients. After it, each rank's first moment
    ``exp_avg`` holds its own gradients' momentum (``state[p]["local"]``), the average
    of the ranks' moments travels through ``compress``, and the variance is frozen
    (``freeze_variance``). Bias correction of the first moment goes on; of the frozen
    variance it stays at its warm-up value.

    Gradient clipping applies to averaged gradients in the warm-up and to each rank's
    own gradient after it (clip before ``step()`` as usual).
    """

    def __init__(self, ddp_model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, warmup_steps: int = 100, compress: str = "onebit@inter",
                 compress_min_bytes: int = 0, freeze_variance: bool = True):
        if not 0.0 <= lr:
            raise InvalidArgument(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise InvalidArgument(f"betas must lie in [0, 1), got {betas}")
        self.freeze_variance = bool(freeze_variance)
        super().__init__(ddp_model, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         warmup_steps=warmup_steps, compress=compress, compress_min_bytes=compress_min_bytes)

    def _warm_up_update(self, p, group) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))

    def _initial_momentum(self, p, state) -> torch.Tensor:
        state["variance_step"] = state["step"]
        return state["exp_avg"]  # every rank starts from the averaged moment

    def _fold(self, p, group, g, send) -> None:
        local = self.state[p]["local"]
        local.lerp_(g.float() if g.dtype != torch.float32 else g, 1 - group["betas"][0])
        if send.data_ptr() != local.data_ptr():
            send.copy_(local)

    def _apply(self, p, group, averaged) -> None:
        state = self.state[p]
        beta1, beta2 = group["betas"]
        previous = state["exp_avg"]
        state["step"] += 1
        t = state["step"]
        if not self.freeze_variance:
            # The average gradient behind the averaged moment (exact uncompressed).
            grad = (averaged - beta1 * previous) / (1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state["variance_step"] = t
        state["exp_avg"].copy_(averaged)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** state["variance_step"])).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


class OneBitSGD(_MomentumExchange):
    """``torch.optim.SGD`` (momentum, optional Nesterov, coupled weight decay) whose
    momentum travels compressed after a warm-up.

    After the warm-up each rank keeps its own momentum buffer of its own gradients
    (weight decay folded in, as SGD folds it), and the average of the buffers (for
    Nesterov, of g + momentum * buffer) travels through ``compress`` with error
    feedback: dist-EF-SGDM's scheme. The residual is in momentum's units, so a
    learning-rate schedule needs no rescaling of it. ``momentum`` must be > 0.
    """

    def __init__(self, ddp_model, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, *, warmup_steps: int = 100, compress: str = "onebit@inter",
                 compress_min_bytes: int = 0):
        if not 0.0 < momentum < 1.0:
            raise InvalidArgument(f"OneBitSGD needs 0 < momentum < 1 (the momentum is what travels), got "
                                  f"{momentum}")
        if lr < 0:
            raise InvalidArgument(f"lr must be >= 0, got {lr}")
        super().__init__(ddp_model, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
                         warmup_steps=warmup_steps, compress=compress, compress_min_bytes=compress_min_bytes)

    @staticmethod
    def _decayed(p, group) -> torch.Tensor:
        g = p.grad
        return g.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else g

    def _warm_up_update(self, p, group) -> None:
        state = self.state[p]
        g = self._decayed(p, group)
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = g.clone()
        else:
            buf.mul_(group["momentum"]).add_(g)
        step = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        p.add_(step, alpha=-group["lr"])

    def _initial_momentum(self, p, state) -> torch.Tensor:
        return state["momentum_buffer"]

    def _sends_direction(self) -> bool:
        return any(g["nesterov"] for g in self.param_groups)

    def _fold(self, p, group, g, send) -> None:
        local = self.state[p]["local"]
        g = self._decayed(p, group)
        local.mul_(group["momentum"]).add_(g)
        if group["nesterov"]:
            # What Nesterov's step moves by, g + momentum * buffer, averaged over the ranks.
            torch.add(g, local, alpha=group["momentum"], out=send)
        elif send.data_ptr() != local.data_ptr():
            send.copy_(local)

    def _apply(self, p, group, averaged) -> None:
        self.state[p].pop("momentum_buffer", None)  # each rank's own momentum ("local") carries on
        p.add_(averaged, alpha=-group["lr"])
