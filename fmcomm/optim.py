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
import os
from typing import Any

import torch
import torch.distributed as dist

from . import compression
from .compression import ErrorFeedback
from .config import Config
from .errors import InvalidArgument

log = logging.getLogger("fmcomm.optim")

# Version of the "fmcomm" part of the optimizers' state_dict; a newer one is refused.
STATE_FORMAT = 1
_KEY = "momentum"  # the error-feedback key of the flat momentum buffer


class _MomentumExchange(torch.optim.Optimizer):
    """What both optimizers share: the hook, the warm-up switch, the exchange of momenta.

    Subclasses define ``_warm_up_update`` (the PyTorch optimizer's step on averaged
    gradients), ``_local_momentum`` (this rank's gradient folded into its momentum,
    and what it sends, both new tensors: the state changes only once every rank's
    are finite) and ``_apply`` (the update from the averaged momentum).
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
            from .communicator import Communicator
            from .transport.torch_dist import TorchTransport
            check = None if "FMCOMM_CHECK" in os.environ else False
            config = Config.from_env(transport="torch", check=check)
            self._comm = Communicator(TorchTransport.private(self._group, config.timeout, "optim"), config)
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
                        # Elements whose averaged gradient stayed exactly zero all warm-up
                        # (padding rows, parameters no input reaches) are masked after it:
                        # 1-bit codes cannot carry a zero, and would set them moving.
                        state = self.state[p]
                        seen = _as_mask(state.get("nonzero"), p)
                        state["nonzero"] = seen | (p.grad != 0)
            self.steps_taken += 1
            return loss
        self._exchange_step()
        self.steps_taken += 1
        return loss

    def _params(self):
        return [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _exchange_step(self) -> None:
        comm = self.communicator()
        params = self._params()
        # (this rank's new momentum, what it sends): kept aside until every rank is finite.
        folded = [self._local_momentum(p, group) for p, group in params]
        momenta = [send for _, send in folded]
        finite = torch.tensor([all(bool(torch.isfinite(m).all()) for m in momenta)], dtype=torch.int32)
        comm.all_reduce(finite, op="min")
        if not bool(finite[0]):
            # Some rank's gradient held NaN or infinity: nobody's state moves this step.
            self.skipped_steps += 1
            log.warning("fmcomm.optim: step %d skipped: a gradient held NaN or infinity on some rank "
                        "(momenta and parameters unchanged)", self.steps_taken)
            return
        for (p, _), (local, _) in zip(params, folded):
            self.state[p]["local"] = local
        big = [(i, m) for i, m in enumerate(momenta) if m.numel() * 4 >= self.compress_min_bytes]
        small = [(i, m) for i, m in enumerate(momenta) if m.numel() * 4 < self.compress_min_bytes]
        averaged: list = [None] * len(momenta)
        for part, spec in ((big, self.spec), (small, None)):
            if not part:
                continue
            flat = torch.cat([m.reshape(-1).float() for _, m in part])
            comm.all_reduce(flat, op="avg", compress=spec if spec is not None and spec.enabled else None,
                            state=self.error_feedback if spec is not None and spec.enabled else None,
                            key=_KEY if spec is not None and spec.enabled else None)
            at = 0
            for i, m in part:
                averaged[i] = flat[at:at + m.numel()].view_as(m)
                at += m.numel()
        for (p, group), local, avg in zip(params, momenta, averaged):
            state = self.state[p]
            mask = state.get("mask")
            if mask is not None:
                mask = mask.bool()  # a loaded checkpoint holds it in the parameter's dtype
                avg = avg.masked_fill(mask, 0.0)
                state["local"].masked_fill_(mask, 0.0)
            self._apply(p, group, state["local"], avg.to(p.dtype) if avg.dtype != p.dtype else avg)

    def _end_warm_up_state(self, p) -> dict:
        """The per-parameter state the exchange starts from (made on its first step)."""
        state = self.state[p]
        if "local" not in state:
            seen = state.pop("nonzero", None)
            if seen is not None and not bool(seen.bool().all()):
                state["mask"] = ~seen.bool()
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
        self._hook_state.load_state_dict(ours["hook"])


def _as_mask(t, p) -> torch.Tensor:
    """A boolean tensor like ``p``: ``t`` (which a loaded checkpoint may hold as floats) or zeros."""
    return torch.zeros_like(p, dtype=torch.bool) if t is None else t.bool()


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

    def _local_momentum(self, p, group):
        state = self._end_warm_up_state(p)
        if "local" not in state:
            state["local"] = state["exp_avg"].clone()  # every rank starts from the averaged moment
            state["variance_step"] = state["step"]
        beta1, _ = group["betas"]
        local = state["local"].lerp(p.grad, 1 - beta1)
        return local, local

    def _apply(self, p, group, local, averaged) -> None:
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
        state["exp_avg"] = averaged.clone()
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

    def _local_momentum(self, p, group):
        state = self._end_warm_up_state(p)
        if "local" not in state:
            state["local"] = state["momentum_buffer"].clone()
        g = self._decayed(p, group)
        local = state["local"].mul(group["momentum"]).add_(g)
        if group["nesterov"]:
            # What Nesterov's step moves by, g + momentum * buffer, averaged over the ranks.
            return local, g.add(local, alpha=group["momentum"])
        return local, local

    def _apply(self, p, group, local, averaged) -> None:
        state = self.state[p]
        if not group["nesterov"]:
            state["momentum_buffer"] = averaged.clone()
        p.add_(averaged, alpha=-group["lr"])
