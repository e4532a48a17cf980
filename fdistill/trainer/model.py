"""A small decoder-only transformer LM in plain PyTorch: logits, hidden states, sampling, log-probs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LMConfig:
    """``vocab`` tokens, ``width``-dimensional residual stream, ``depth`` pre-LayerNorm blocks of
    ``heads``-head causal attention + MLP, positions up to ``context``. ``attn_window`` restricts each
    position to the last ``attn_window`` positions (itself included): a model that cannot see far back
    (a structured, learnable limitation). ``head_scale`` multiplies the initial LM-head weight (a
    sharper random model) and ``attn_gain`` the initial attention output projections (a random model
    whose predictions depend more on the context than on the current token)."""

    vocab: int = 32
    width: int = 64
    depth: int = 2
    heads: int = 4
    context: int = 24
    attn_window: int | None = None
    head_scale: float = 1.0
    attn_gain: float = 1.0

    def __post_init__(self):
        for name in ("vocab", "width", "depth", "heads", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be an int >= 1, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"LMConfig.width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.attn_window is not None and self.attn_window < 1:
            raise ValueError(f"LMConfig.attn_window must be None or >= 1, got {self.attn_window}")

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width)
        )

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """``logits = head(LN(blocks(embed(tokens) + pos)))``; ``hidden()`` gives the head's input, for the
    fused-linear losses (``lm_head.weight`` is the head)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.mul_(cfg.head_scale)
            for block in self.blocks:
                block.proj.weight.mul_(cfg.attn_gain)

    def _mask(self, t: int, device) -> torch.Tensor:
        i = torch.arange(t, device=device)
        allowed = i[None, :] <= i[:, None]
        if self.cfg.attn_window is not None:
            allowed &= i[None, :] > i[:, None] - self.cfg.attn_window
        return allowed

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids -> ``(B, T, width)`` final hidden states."""
        if tokens.dim() != 2 or tokens.shape[1] > self.cfg.context:
            raise ValueError(
                f"tokens must be (batch, T) with T <= context = {self.cfg.context}, got {tuple(tokens.shape)}"
            )
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mask = self._mask(tokens.shape[1], tokens.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` -> ``(B, T, vocab)`` next-token logits (position n predicts token n + 1)."""
        return self.lm_head(self.hidden(tokens))

    @torch.no_grad()
    def sample(
        self,
        prompts: torch.Tensor,
        length: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(B, P)`` prompts -> ``(B, P + length)`` sequences, sampling from softmax(logits / T)
        restricted to the ``top_k`` most likely tokens (all when None)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.cfg.vocab:
            raise ValueError(f"top_k must be None or in [1, {self.cfg.vocab}], got {top_k}")
        if prompts.shape[1] + length > self.cfg.context:
            raise ValueError(
                f"prompt ({prompts.shape[1]}) + length ({length}) exceeds context {self.cfg.context}"
            )
        seq = prompts
        for _ in range(length):
            logits = self(seq)[:, -1].double() / temperature
            if top_k is not None and top_k < self.cfg.vocab:
                kth = logits.topk(top_k, -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            seq = torch.cat([seq, nxt], 1)
        return seq

    def completion_logits(self, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """``(B, L, vocab)`` logits of the completion tokens ``seq[:, prompt_len:]``."""
        return self(seq[:, :-1])[:, prompt_len - 1 :]

    def completion_hidden(self, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """``(B, L, width)`` hidden states predicting the completion tokens (fused-linear losses)."""
        return self.hidden(seq[:, :-1])[:, prompt_len - 1 :]

    def sequence_logprobs(self, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """``(B, L)`` log p(y_n | x, y_<n) of each completion token."""
        logits = self.completion_logits(seq, prompt_len)
        logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        return logp.gather(-1, seq[:, prompt_len:, None]).squeeze(-1)


TILT_KEYS = ("token", "token_position", "position", "prompt")
PROMPT_BUCKETS = 4096  # the ``prompt`` tilt's table rows: prompts are hashed into this many


class TiltedLM(nn.Module):
    """``base``'s next-token logits plus a fixed random **tilt** keyed on the context:
    ``logits[n] += table[key_n]`` with ``table ~ scale * N(0, 1)`` rows of ``vocab`` entries.

    ``key="token"``: a **bigram** tilt, ``key_n`` = token n (a ``(vocab, vocab)`` table): one global
    preference for some next tokens after each token, learnable from any data. ``key="token_position"``:
    ``key_n`` = (position n, token n) (a ``(context, vocab, vocab)`` table): the error differs at every
    position, so a model learns it cell by cell from the contexts it sees, ``context`` times slower.
    ``key="position"``: ``key_n`` = position n (a ``(context, vocab)`` table): every sequence shows
    every row, so any data teaches it at the same rate. ``key="prompt"``: ``key_n`` = a hash of the
    first ``prompt_len`` tokens into ``PROMPT_BUCKETS`` rows, the same row at every position: an error
    specific to each prompt, which a model can only memorise from prompts it sees again.

    A model with a systematic, context-dependent error (like a stylistic bias in a teacher's training
    data): trained to imitate it, a model inherits the error, and a student can in turn pick it up.
    Sampling, completion logits and log-probs are :class:`TinyLM`'s (they only use ``forward`` and
    ``cfg``)."""

    def __init__(
        self, base: TinyLM, scale: float, generator: torch.Generator, key: str = "token", prompt_len: int = 0
    ):
        super().__init__()
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if key not in TILT_KEYS:
            raise ValueError(f"key must be one of {list(TILT_KEYS)}, got {key!r}")
        if key == "prompt" and not (isinstance(prompt_len, int) and prompt_len >= 1):
            raise ValueError(f"key='prompt' needs prompt_len >= 1, got {prompt_len!r}")
        self.base, self.cfg, self.key, self.prompt_len = base, base.cfg, key, prompt_len
        v, n = base.cfg.vocab, base.cfg.context
        shape = {
            "token": (v, v),
            "token_position": (n, v, v),
            "position": (n, v),
            "prompt": (PROMPT_BUCKETS, v),
        }
        self.register_buffer("table", scale * torch.randn(*shape[key], generator=generator))
        if key == "prompt":  # the hash: tokens times a fixed random weight per position, summed, mod rows
            weights = torch.randint(1, PROMPT_BUCKETS, (prompt_len,), generator=generator)
            self.register_buffer("hash_weights", weights, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.base(tokens)
        if self.key == "token":
            return logits + self.table[tokens]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        if self.key == "token_position":
            return logits + self.table[positions, tokens]
        if self.key == "position":
            return logits + self.table[positions]
        row = (tokens[:, : self.prompt_len] * self.hash_weights).sum(1) % PROMPT_BUCKETS
        return logits + self.table[row][:, None, :]

    sample = TinyLM.sample
    completion_logits = TinyLM.completion_logits
    sequence_logprobs = TinyLM.sequence_logprobs
