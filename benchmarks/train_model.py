"""The model and data of ``benchmarks/train.py`` (see its docstring for why these).

* :func:`load_corpus`: the Python standard library's own ``.py`` files, sorted by
  path and concatenated, up to ``max_bytes``; bytes are the tokens (vocabulary 256).
* :class:`Batches`: rank-strided training windows, deterministic per
  (seed, step, rank), and fixed held-out windows for the validation loss.
* :class:`CharGPT`: a small GPT (pre-LayerNorm blocks, causal attention) over a large,
  cheap input embedding: token + position + hashed byte-bigram + hashed
  byte-trigram tables, summed (fastText-style hashed n-gram features).
"""
from __future__ import annotations

import math
import sysconfig
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256
_MIX = 1_000_003      # combines the bytes of an n-gram (< 2^20, so products stay in int64)
_GOLD = 2654435761    # Knuth's multiplicative hash constant (~2^31.3)


# ---------------------------------------------------------------------------- data

def load_corpus(max_bytes: int = 8 << 20, val_fraction: float = 0.05):
    """(train bytes, validation bytes, info) from the stdlib's .py files.

    Files are taken in sorted order of their path under the stdlib directory and cut
    at ``max_bytes``; the last ``val_fraction`` of the result is held out. ``info``
    carries the directory, file count, size and a CRC-32 so ranks on different
    machines can check they read the same bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and "site-packages" not in p.parts)
    parts, total, used = [], 0, 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        parts.append(b)
        total += len(b)
        used += 1
        if total >= max_bytes:
            break
    blob = b"".join(parts)[:max_bytes]
    if len(blob) < 1 << 20:
        raise RuntimeError(f"only {len(blob)} bytes of .py files under {root}; the benchmark wants ~8 MB")
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    cut = int(len(data) * (1.0 - val_fraction))
    info = {"stdlib": str(root), "files": used, "bytes": len(blob), "train_bytes": cut,
            "val_bytes": len(blob) - cut, "crc32": f"{zlib.crc32(blob):08x}"}
    return data[:cut].clone(), data[cut:].clone(), info


class Batches:
    """Windows of ``ctx + 3`` bytes: 2 bytes of n-gram history, ``ctx`` inputs, 1 more target.

    Step ``s`` draws ``batch * world`` window starts from a generator seeded by
    (seed, s); rank ``r`` takes every ``world``-th one starting at ``r``. So every rank
    reads different windows, the same ones in every config, and the compute-only
    pass sees the very batches the training runs see.
    """

    def __init__(self, train: torch.Tensor, val: torch.Tensor, ctx: int, batch: int, seed: int,
                 rank: int, world: int, val_batches: int = 8, val_batch: int = 16):
        self.train, self.val, self.ctx, self.batch = train, val, ctx, batch
        self.seed, self.rank, self.world = seed, rank, world
        span = ctx + 3
        if len(val) < span * 2:
            raise RuntimeError("validation split too small")
        n = val_batches * val_batch
        starts = torch.linspace(0, len(val) - span - 1, n).long()  # evenly spaced, same on every rank
        self._val = [self._windows(val, starts[i * val_batch:(i + 1) * val_batch]) for i in range(val_batches)]

    def _windows(self, data: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(self.ctx + 3)[None, :]
        w = data[idx].long()
        return w[:, :-1], w[:, 3:]  # inputs with 2 bytes of history; targets = next byte of each input

    def train_batch(self, step: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.ctx - 3, (self.batch * self.world,), generator=g)
        return self._windows(self.train, starts[self.rank::self.world])

    def val_batches(self):
        return self._val


# --------------------------------------------------------------------------- model

def _hash(code: torch.Tensor, bits: int) -> torch.Tensor:
    return (((code & 0x7FFFFFFF) * _GOLD) >> 16) & ((1 << bits) - 1)


class HashedNgramEmbedding(nn.Module):
    """token + position + hashed (previous 2 bytes) + hashed (previous 3 bytes) embeddings."""

    def __init__(self, d: int, ctx: int, bits: int):
        super().__init__()
        self.bits, self.ctx = bits, ctx
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(ctx, d)
        self.bigram = nn.Embedding(1 << bits, d)
        self.trigram = nn.Embedding(1 << bits, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T + 2) bytes; position t of the output sees bytes x[t], x[t+1], x[t+2].
        a, b, c = x[:, :-2], x[:, 1:-1], x[:, 2:]
        h2 = _hash(b * _MIX ^ c, self.bits)
        h3 = _hash(((a * _MIX ^ b) & 0xFFFFFFF) * _MIX ^ c, self.bits)
        t = c.shape[1]
        return (self.tok(c) + self.bigram(h2) + self.trigram(h3)
                + self.pos(torch.arange(t, device=x.device))[None])


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (z.view(B, T, self.heads, D // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4, ctx: int = 64, bits: int = 15):
        super().__init__()
        self.embed = HashedNgramEmbedding(d, ctx, bits)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
                if name.endswith(("proj.weight", "out.weight")):  # GPT-2: residual projections scaled by depth
                    p.data.mul_(1.0 / math.sqrt(2 * layers))
            else:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
