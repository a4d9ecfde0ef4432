"""Bidirectional multi-head attention with RoPE and per-head QK-RMSNorm, and the attention masks.

Masks (docs/design.md §3):
- `full`: every real token attends to every real token;
- `prefix`: prefix tokens (image + prompt) attend only to prefix tokens, every other token attends
  to everything. The prefix keys/values then do not depend on the response, so a decoder can
  compute them once per request and reuse them at every step (LaViDa's Prefix-DLM).
- `causal`: every token attends to itself and the tokens before it (an AR model).
- `block`: as `prefix`, but the response is cut into blocks and a response token attends to the
  prefix, the earlier blocks and its own block (LLaDA2.0; BD3-LM, Arriola et al. 2025,
  arXiv:2503.09573). Committed blocks never see later ones, so a decoder caches their keys and
  values exactly. `block_diffusion_mask` is the training layout: a noisy and a clean copy of the
  response in one sequence.
Padding keys are never attended to, so padding cannot affect real positions. Rows packed with
several documents (`document_ids`) add a document-level mask to any of these: a token sees only
its own document's keys, and RoPE positions restart at each document (`within_documents`,
`token_positions`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 variance underflows for small activations.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, rotary_dim] for the rotate-half RoPE convention used by LLaMA/OLMoE;
    `rotary_dim` is the head dim, or its leading part under a partial rotary factor."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, hd]; cos/sin [B, L, r]: the leading r dims of each head rotate, the rest pass."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos[:, None] + rotated * sin[:, None]
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)


def build_attention_mask(
    key_is_real: torch.Tensor,
    query_is_prefix: torch.Tensor | None,
    key_is_prefix: torch.Tensor | None,
    causal_from: int | None = None,
    num_queries: int = 0,
) -> torch.Tensor:
    """Boolean mask broadcastable to [B, 1, Lq, Lk] (True = may attend).

    `query_is_prefix`/`key_is_prefix` are None for the `full` mask. Queries that are not prefix
    (response tokens, and padding, whose outputs are never used) see every real key; prefix
    queries see only real prefix keys. `causal_from` (the `causal` mask): the `num_queries`
    queries are keys causal_from.. and see no later key.
    """
    allowed = key_is_real[:, None, None, :]  # broadcasts over heads and queries
    if query_is_prefix is not None and key_is_prefix is not None:
        allowed = allowed & (~query_is_prefix[:, None, :, None] | key_is_prefix[:, None, None, :])
    if causal_from is not None:  # query i is key causal_from + i and sees keys up to itself
        keys = torch.arange(key_is_real.shape[1], device=key_is_real.device)
        queries = causal_from + torch.arange(num_queries, device=key_is_real.device)
        allowed = allowed & (keys[None, :] <= queries[:, None])[None, None]
    return allowed


PROMPT, NOISY, CLEAN = 0, 1, 2  # the copies of a block-diffusion training sequence


def token_positions(is_real: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] RoPE position of each token: the real tokens before it in its row, so left padding
    does not shift RoPE, or in its document of a packed row (documents are contiguous runs of
    `document_ids`). Padding gets position 0 (or its row's last position) and is never attended to."""
    return _rank_within_document(is_real, document_ids).clamp(min=0)


def within_documents(mask: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """`mask` [B, 1, L, L] restricted to query-key pairs of the same packed document (unchanged
    without `document_ids`). A padding query (id -1) keeps every key, as without packing: a query
    that sees no key at all has undefined attention (NaN in some kernels), and padding outputs are
    never used."""
    if document_ids is None:
        return mask
    return mask & ((_queries(document_ids) == _keys(document_ids)) | (_queries(document_ids) < 0))


def _rank_within_document(counted: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, L] how many `counted` tokens come before each token (itself included) in its document,
    minus one; over the whole row without `document_ids`."""
    rank = counted.long().cumsum(1)
    if document_ids is not None:  # subtract the count reached where the token's document starts
        starts = torch.ones_like(counted)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        before = torch.where(starts, rank - counted.long(), 0)
        rank = rank - before.cummax(dim=1).values
    return rank - 1


def response_blocks(
    is_prefix: torch.Tensor, is_real: torch.Tensor, block_size: int, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, L] block index of each response token (its rank among the real non-prefix tokens of its
    row, or of its document in a packed row, // block_size), -1 for prefix and padding."""
    response = is_real & ~is_prefix
    return torch.where(response, _rank_within_document(response, document_ids) // block_size, -1)


def block_diffusion_mask(
    copy_q: torch.Tensor,
    block_q: torch.Tensor,
    copy_k: torch.Tensor,
    block_k: torch.Tensor,
    key_real: torch.Tensor,
) -> torch.Tensor:
    """[B, 1, Lq, Lk] mask of a block-diffusion sequence (BD3-LM's construction): prompt tokens
    (copy PROMPT) see the prompt; a NOISY token of block j sees the prompt, its own noisy block and
    the CLEAN blocks before j; a CLEAN token of block j sees the prompt and the clean blocks up to
    j. With only PROMPT and CLEAN tokens this is the `block` mask of one sequence."""
    noisy_q, clean_q = _queries(copy_q) == NOISY, _queries(copy_q) == CLEAN
    noisy_k, clean_k = _keys(copy_k) == NOISY, _keys(copy_k) == CLEAN
    bq, bk = _queries(block_q), _keys(block_k)
    sees = (_keys(copy_k) == PROMPT) & (_queries(copy_q) >= PROMPT)  # broadcast to [B, 1, Lq, Lk]
    sees = (
        sees | noisy_q & noisy_k & (bk == bq) | noisy_q & clean_k & (bk < bq) | clean_q & clean_k & (bk <= bq)
    )
    return sees & _keys(key_real)


def _queries(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, :, None]  # [B, L] → broadcast over heads and keys


def _keys(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None, :]  # [B, L] → broadcast over heads and queries


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qk_norm: bool,
        eps: float,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the output and this call's own (k, v) [B, Hkv, L, hd] (after norm and RoPE),
        which is what a cache stores. With `past_kv`, this call's keys/values follow the cached
        ones (a cached prefix), or with `start` they are written over the cached positions
        start..start+L-1 (the block of a cached sequence), in place: a block cache then holds
        the block's latest keys, and no step copies the whole cache."""
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own_kv = (k, v)
        if past_kv is not None and start is None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        elif past_kv is not None:
            for cached, own in zip(past_kv, own_kv, strict=True):
                cached[:, :, start : start + length] = own
            k, v = past_kv
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1)), own_kv
