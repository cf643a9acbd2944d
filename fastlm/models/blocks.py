"""The one set of building blocks shared by EncoderLM, DecoderLM and Seq2SeqLM.

Shapes: B batch, T tokens, D d_model, H query heads, Hkv key/value heads, hd head_dim, S source (memory) tokens.
Padding convention: `lengths` [B] counts the real tokens of each row; padding sits at the right. Packed rows
(several sentences per row, each attending within itself) come as a Packing instead (see packing.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.kernels import attention, attention_varlen

from .config import ModelConfig
from .kv_cache import AttentionCache, KVCache
from .packing import Packing


def sinusoidal_table(positions: Tensor, dim: int) -> Tensor:
    """(B, T) positions -> (B, T, dim) fixed sine/cosine encodings of "Attention Is All You Need"."""
    frequencies = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = positions.float()[..., None] * frequencies          # (B, T, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate (B, heads, T, hd) by angles of (B, T) positions; the halves of hd form the rotated pairs."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = (positions.float()[..., None] * frequencies)[:, None]   # (B, 1, T, hd/2), broadcast over heads
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def attention_mask(n_queries: int, n_keys: int, *, causal: bool, kv_lens: Tensor | None, device,
                   packing: Packing | None = None, key_packing: Packing | None = None) -> Tensor | None:
    """Boolean (B or 1, 1, Nq, Nk) mask, True = may attend; causal aligned bottom-right like the fastlm kernel;
    with `packing` (packed query rows), within each sequence only: of the same rows, or of `key_packing`'s."""
    mask = None
    if causal:
        query = torch.arange(n_queries, device=device)[:, None]
        key = torch.arange(n_keys, device=device)[None, :]
        mask = (key <= query + n_keys - n_queries)[None, None]
    if kv_lens is not None:
        valid = (torch.arange(n_keys, device=device) < kv_lens[:, None])[:, None, None, :]
        mask = valid if mask is None else mask & valid
    if packing is not None:
        same_sequence = packing.same_sequence(key_packing)
        mask = same_sequence if mask is None else mask & same_sequence
    return mask


# Device types where attn_impl="fastlm" runs fastlm's Triton kernel. Elsewhere (the CPU) it takes torch's SDPA,
# which computes the same function (the kernel's reference path is its test oracle) with a fused flash kernel that
# is several times faster than the reference's unfused math; tests add "cpu" to reach the kernel under Triton's
# interpreter.
KERNEL_DEVICE_TYPES = ("cuda",)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, queries: Packing, keys: Packing, *, causal: bool,
                     dropout_p: float) -> Tensor:
    """fastlm's varlen kernel over packed rows: q (B, H, Tq, hd) and k, v (B, Hkv, Tk, hd), flattened to its
    (B * T, heads, hd); query sequence i of `queries` attends to key sequence i of `keys`. Returns (B, H, Tq, hd)."""

    def flat(x: Tensor) -> Tensor:
        batch, heads, length, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch * length, heads, head_dim)

    out = attention_varlen(flat(q), flat(k), flat(v), queries.cu_seqlens, keys.cu_seqlens, queries.max_seqlen,
                           keys.max_seqlen, causal=causal, dropout_p=dropout_p)
    return out.view(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)


def scaled_dot_product(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, kv_lens: Tensor | None, dropout_p: float, impl: str,
    packing: Packing | None = None, key_packing: Packing | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v for q (B, H, Nq, hd), k/v (B, Hkv, Nk, hd) with one of three implementations.

    kv_lens = None means no row is padded: the caller knows it from the batch's structure (causal-LM blocks carry no
    lengths), since reading a device tensor to find out would cost a host sync on every forward. `packing`: packed
    query rows, each sequence attending within itself (self-attention) or, with `key_packing`, to the key sequence of
    its index (cross-attention over packed pairs); kv_lens is then None, the padding being a sequence of its own. On
    the CPU that mask is dense (B, 1, Nq, Nk): FlexAttention's document masks would skip the blocks
    between sentences, but torch 2.13 has no FlexAttention backward on the CPU, and SDPA over nested jagged tensors
    was 4x slower there (docs/PERFORMANCE.md, Packed batches)."""
    if impl == "fastlm" and q.device.type in KERNEL_DEVICE_TYPES:
        if packing is not None:
            keys = key_packing if key_packing is not None else packing
            return packed_attention(q, k, v, packing, keys, causal=causal, dropout_p=dropout_p)
        return attention(q, k, v, causal=causal, kv_lens=kv_lens, dropout_p=dropout_p)
    n_queries, n_keys = q.shape[2], k.shape[2]
    if impl == "eager":
        # The teaching version. Each key/value head serves n_heads / n_kv_heads query heads.
        mask = attention_mask(n_queries, n_keys, causal=causal, kv_lens=kv_lens, device=q.device, packing=packing,
                              key_packing=key_packing)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])     # (B, H, Nq, Nk)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probabilities = F.dropout(scores.softmax(dim=-1), p=dropout_p)
        return probabilities @ v
    # SDPA picks flash or cuDNN only without a mask: an unpadded causal block goes as is_causal (its causal mask is
    # aligned top-left, ours bottom-right: the same only for square blocks), and an unpadded bidirectional one bare.
    # The mask is built only where padding (or a non-square causal block) needs it.
    is_causal = causal and kv_lens is None and packing is None and n_queries == n_keys
    mask = None if is_causal else attention_mask(n_queries, n_keys, causal=causal, kv_lens=kv_lens, device=q.device,
                                                 packing=packing, key_packing=key_packing)
    # SDPA's bf16 forward and backward on the CPU took 3.6x as long as casting to fp32 and back around the fp32 call
    # (tiny preset, 32 rows of 48 tokens, docs/PERFORMANCE.md): under CPU autocast, training attends in fp32
    # (inside, autocast would cast back to bf16). Inference keeps bf16: that forward is as fast.
    dtype = q.dtype
    upcast = q.device.type == "cpu" and dtype == torch.bfloat16 and q.requires_grad
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
        )
    return out.to(dtype)


class Embeddings(nn.Module):
    """Token embedding plus the absolute position encoding (none for rope: it is applied inside attention)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_seq_len, config.d_model) if config.positional == "learned" else None
        # The fixed sinusoids have unit amplitude; scaling the small-init token embedding by sqrt(D) (as Vaswani et
        # al. do) keeps the tokens from being drowned by their positions.
        self.token_scale = math.sqrt(config.d_model) if config.positional == "sinusoidal" else 1.0
        # Post-norm (BERT) normalises the embeddings; pre-norm leaves that to the first block's norm.
        post = config.norm_position == "post"
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if post else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """(B, T) ids and (B or 1, T) positions -> (B, T, D)."""
        x = self.token(input_ids) * self.token_scale
        if self.config.positional == "learned":
            x = x + self.position(positions)
        elif self.config.positional == "sinusoidal":
            x = x + sinusoidal_table(positions, self.config.d_model).to(x.dtype)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads; self-attention (optionally causal) or cross-attention."""

    def __init__(self, config: ModelConfig, *, cross: bool = False):
        super().__init__()
        self.config, self.cross = config, cross
        kv_width = config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, kv_width)
        self.v_proj = nn.Linear(config.d_model, kv_width)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def _split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, n_heads, self.config.head_dim).transpose(1, 2)   # (B, heads, T, hd)

    def _keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        heads = self.config.kv_heads
        return self._split_heads(self.k_proj(source), heads), self._split_heads(self.v_proj(source), heads)

    def forward(
        self,
        x: Tensor,
        *,
        kv_lens: Tensor | None,
        causal: bool = False,
        positions: Tensor | None = None,
        memory: Tensor | None = None,
        cache: AttentionCache | None = None,
        stepping: bool = False,
        packing: Packing | None = None,
        memory_packing: Packing | None = None,
    ) -> Tensor:
        """x (B, T, D) -> (B, T, D). Cross-attention reads keys/values from `memory` (B, S, D). Over packed rows
        (`packing`) self-attention attends within each sequence, and cross-attention from sequence i to sequence i
        of the packed memory (`memory_packing`).

        With a cache, self-attention writes its keys/values at `positions`; when `stepping` (one new token per row,
        the earlier ones cached) it attends over the whole cache, `kv_lens` marking the valid keys of each row.
        Cross-attention keys/values are computed from memory once and then read back from the cache."""
        q = self._split_heads(self.q_proj(x), self.config.n_heads)
        if self.cross:
            if cache is not None and cache.keys is not None:
                k, v = cache.keys, cache.values
            else:
                k, v = self._keys_values(memory)
                if cache is not None:
                    cache.keys, cache.values = k, v
        else:
            k, v = self._keys_values(x)
            if self.config.positional == "rope":
                q = apply_rope(q, positions, self.config.rope_theta)
                k = apply_rope(k, positions, self.config.rope_theta)
            if cache is not None:
                cached_k, cached_v = cache.write(k, v, positions)
                if stepping:
                    # One query per row, its keys masked by kv_lens alone: the causal mask has nothing left to do.
                    k, v, causal = cached_k, cached_v, False
        dropout_p = self.config.attn_dropout if self.training else 0.0
        out = scaled_dot_product(q, k, v, causal=causal, kv_lens=kv_lens, dropout_p=dropout_p,
                                 impl=self.config.attn_impl, packing=packing,
                                 key_packing=memory_packing if self.cross else packing)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.config.d_model))


class FeedForward(nn.Module):
    """Position-wise MLP: D -> d_ff -> D with GELU or ReLU, or the gated SwiGLU of PaLM/LLaMA (a d_ff gate times
    a d_ff value: 1.5x the parameters of the other two at the same d_ff; LLaMA shrinks d_ff by 2/3 to match)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        gated = config.activation == "swiglu"
        self.up_proj = nn.Linear(config.d_model, config.d_ff * (2 if gated else 1))
        self.down_proj = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.up_proj(x)
        if self.activation == "swiglu":
            gate, value = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * value
        else:
            hidden = F.gelu(hidden) if self.activation == "gelu" else F.relu(hidden)
        return self.down_proj(hidden)


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual branch with pre- or post-norm."""

    def __init__(self, config: ModelConfig, *, causal: bool, cross_attention: bool = False):
        super().__init__()
        self.config, self.causal = config, causal
        self.self_attn = Attention(config)
        self.self_attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.cross_attn = Attention(config, cross=True) if cross_attention else None
        self.cross_attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if cross_attention else None
        self.ff = FeedForward(config)
        self.ff_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: Tensor, norm: nn.LayerNorm, branch) -> Tensor:
        if self.config.norm_position == "pre":
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))

    def forward(
        self,
        x: Tensor,
        *,
        lengths: Tensor | None,
        positions: Tensor,
        memory: Tensor | None = None,
        memory_lengths: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        packing: Packing | None = None,
        memory_packing: Packing | None = None,
    ) -> Tensor:
        stepping = cache is not None and cache.filled
        x = self._residual(x, self.self_attn_norm, lambda h: self.self_attn(
            h, kv_lens=lengths, causal=self.causal, positions=positions, stepping=stepping,
            cache=cache.attention(layer, "self") if cache is not None else None, packing=packing))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn_norm, lambda h: self.cross_attn(
                h, kv_lens=memory_lengths, memory=memory, packing=packing, memory_packing=memory_packing,
                cache=cache.attention(layer, "cross") if cache is not None else None))
        return self._residual(x, self.ff_norm, self.ff)


def packings(input_ids: Tensor, cu_seqlens: Tensor | None, memory: Tensor | None, memory_cu_seqlens: Tensor | None,
             cache: KVCache | None) -> tuple[Packing, Packing | None]:
    """The Packing of packed rows and of the memory they cross-attend to (None without a memory); a ValueError for
    what packed rows are not for: generation, whose KV cache holds one sequence per row, or a memory packed
    without its rows (or the reverse)."""
    if cache is not None:
        raise ValueError("cu_seqlens with a KV cache: packed rows are for training and evaluation; generation "
                         "takes one sequence per row")
    if cu_seqlens is None:
        raise ValueError("memory_cu_seqlens without cu_seqlens: a packed memory pairs its sequences with those of "
                         "packed rows")
    if memory is not None and memory_cu_seqlens is None:
        raise ValueError("cu_seqlens with a memory but no memory_cu_seqlens: cross-attention over packed rows needs "
                         "the offsets of the memory's sequences, sequence i of the rows attending to its sequence i")
    if memory is None and memory_cu_seqlens is not None:
        raise ValueError("memory_cu_seqlens without a memory: there is no cross-attention to pair sequences for")
    memory_packing = None if memory is None else Packing.from_offsets(memory_cu_seqlens, *memory.shape[:2])
    return Packing.from_offsets(cu_seqlens, *input_ids.shape), memory_packing


class TransformerStack(nn.Module):
    """Embeddings, n_layers blocks and the final norm: the body of every model here (causal or bidirectional)."""

    def __init__(self, config: ModelConfig, *, causal: bool, cross_attention: bool = False):
        super().__init__()
        self.config, self.causal = config, causal
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(
            Block(config, causal=causal, cross_attention=cross_attention) for _ in range(config.n_layers)
        )
        # Pre-norm leaves the residual stream unnormalised: normalise what leaves the last block (post-norm did).
        pre = config.norm_position == "pre"
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if pre else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms (the GPT-2 / BERT init)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        # GPT-2: every residual branch adds to the stream, so the projections into it start 1/sqrt(2 n_layers)
        # smaller and the stream's variance stays put as depth grows.
        for block in self.blocks:
            projections = [block.self_attn.out_proj, block.ff.down_proj]
            if block.cross_attn is not None:
                projections.append(block.cross_attn.out_proj)
            for projection in projections:
                nn.init.normal_(projection.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))

    def forward(
        self,
        input_ids: Tensor,
        lengths: Tensor | None,
        *,
        memory: Tensor | None = None,
        memory_lengths: Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: Tensor | None = None,
        memory_cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """(B, T) ids -> (B, T, D) hidden states.

        Without a cache, or with an empty one (which this call fills), the ids are whole rows. With a filled cache
        they are (B, 1): the last token of each row, at position lengths - 1, the earlier ones being cached.
        With cu_seqlens (packed rows, see packing.py) positions restart in every sequence and each attends within
        itself; padding is a sequence of its own, so `lengths` no longer masks attention. A memory packed likewise
        comes with memory_cu_seqlens (pairing its sequences with the rows', see packing.py), and memory_lengths
        no longer masks cross-attention."""
        packing = memory_packing = None
        if cu_seqlens is not None or memory_cu_seqlens is not None:
            packing, memory_packing = packings(input_ids, cu_seqlens, memory, memory_cu_seqlens, cache)
            positions, lengths, memory_lengths = packing.positions, None, None
        elif cache is not None and cache.filled:
            positions = (lengths - 1)[:, None]
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.embeddings(input_ids, positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, lengths=lengths, positions=positions, memory=memory, memory_lengths=memory_lengths,
                      cache=cache, layer=layer, packing=packing, memory_packing=memory_packing)
        if cache is not None:
            cache.filled = True
        return self.final_norm(x)
