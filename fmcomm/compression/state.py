"""Error-feedback state: the residuals a compressor keeps between calls.

One :class:`ErrorFeedback` holds the residuals of any number of tensors, each under
the key its caller chose (one per gradient bucket, say), and under each key one slot
per coding level. A slot holds the *worker* residual (this rank's values the last
code did not carry, one per element of the input at that level) and the *server*
residual (the same for the chunk this rank owns). Residuals are float32 and live on
the tensor's device.

``state_dict()`` is a plain ``dict[str, torch.Tensor]`` (names ``KEY/LEVEL/worker``
and ``KEY/LEVEL/server``), so it goes into a checkpoint with ``torch.save`` next to
the model's; ``load_state_dict()`` puts it back and ``reset()`` forgets it.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import InvalidArgument


@dataclasses.dataclass
class Slot:
    worker: torch.Tensor
    server: torch.Tensor
    # The worker residual of the chunk this rank owns is known to be zero: nothing
    # writes it (an owner's own values go uncoded), so only a loaded checkpoint can
    # hold something there, which the first call adds and clears.
    own_clear: bool = False


def _check_key(key) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise InvalidArgument(f"error-feedback key must be a str or int, got {type(key).__name__}")
    text = str(key)
    if "/" in text:
        raise InvalidArgument(f"error-feedback key {text!r} must not contain '/'")
    return text


class ErrorFeedback:
    def __init__(self):
        self._slots: dict[tuple[str, str], Slot] = {}

    def slot(self, key, level: str, worker_count: int, server_count: int, device) -> Slot:
        """The residuals of ``key`` at ``level``, made (zero) on first use.

        A key seen before with other sizes means the caller reused one state for
        different tensors, which would add one tensor's leftovers to another's.
        """
        name = (_check_key(key), level)
        s = self._slots.get(name)
        if s is None:
            s = self._slots[name] = Slot(torch.zeros(worker_count, dtype=torch.float32, device=device),
                                         torch.zeros(server_count, dtype=torch.float32, device=device), True)
            return s
        if s.worker.numel() != worker_count or s.server.numel() != server_count:
            raise InvalidArgument(
                f"error-feedback state for key {name[0]!r} ({level}) holds residuals of {s.worker.numel()} / "
                f"{s.server.numel()} elements, but this call needs {worker_count} / {server_count}: "
                f"one key per tensor (bucket), or reset() the state when the model changes")
        if s.worker.device != torch.device(device):
            s.worker, s.server = s.worker.to(device), s.server.to(device)
        return s

    def keys(self) -> list[str]:
        return sorted({k for k, _ in self._slots})

    def reset(self, key=None) -> None:
        """Forget every residual, or only those of ``key``."""
        if key is None:
            self._slots.clear()
            return
        k = _check_key(key)
        for name in [n for n in self._slots if n[0] == k]:
            del self._slots[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for (key, level), s in sorted(self._slots.items()):
            out[f"{key}/{level}/worker"] = s.worker.clone()
            out[f"{key}/{level}/server"] = s.server.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        slots: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for name, t in state.items():
            parts = name.split("/")
            if len(parts) != 3 or parts[2] not in ("worker", "server"):
                raise InvalidArgument(f"error-feedback state entry {name!r} is not KEY/LEVEL/worker|server")
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1:
                raise InvalidArgument(f"error-feedback state entry {name!r} must be a 1-D float32 tensor")
            slots.setdefault((parts[0], parts[1]), {})[parts[2]] = t
        for name, roles in slots.items():
            if set(roles) != {"worker", "server"}:
                raise InvalidArgument(f"error-feedback state for {name[0]!r} ({name[1]}) lacks its "
                                      f"{({'worker', 'server'} - set(roles)).pop()} residual")
        self._slots = {n: Slot(r["worker"].clone(), r["server"].clone()) for n, r in slots.items()}

    def __len__(self) -> int:
        return len(self._slots)
