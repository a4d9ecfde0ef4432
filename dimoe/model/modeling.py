"""DiMoE-VL: a bidirectional MoE transformer (LLaDA-MoE / OLMoE layout) with a SigLIP vision
tower, read top to bottom:

    tokens → embedding (image-token positions replaced by projected vision features)
           → N × [RMSNorm → attention (RoPE, QK-RMSNorm) → + → RMSNorm → MoE FFN → +]
           → RMSNorm → LM head → logits over the vocabulary at every position.

The model predicts the clean token at every position in one bidirectional pass; masked-diffusion
training and decoding live in `dimoe.diffusion` and only see logits and router outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .attention import (
    CLEAN,
    PROMPT,
    Attention,
    RMSNorm,
    block_diffusion_mask,
    build_attention_mask,
    response_blocks,
    rope_cos_sin,
    token_positions,
    within_documents,
)
from .config import DiMoEConfig
from .moe import Experts, MoEBlock, RouterOutput, SwiGLU, TopKRouter
from .vision import VisionTower


@dataclass
class PrefixCache:
    """Keys/values of the leading positions of a sequence for every layer. Of the prefix (image +
    prompt) they are exact for `prefix`-mask models: the prefix never attends to the response, so
    they never change during decoding. Of a whole sequence they make a `BlockCache`."""

    key_values: list[tuple[torch.Tensor, torch.Tensor]]
    attention_mask: torch.Tensor  # [B, Lp] real-token mask of the cached positions

    def select(self, rows: torch.Tensor) -> PrefixCache:
        """The cache of a subset of batch rows (for a decoder that drops finished sequences)."""
        return PrefixCache([(k[rows], v[rows]) for k, v in self.key_values], self.attention_mask[rows])

    def extend(self, after: PrefixCache) -> PrefixCache:
        """These positions followed by those of `after` (e.g. a prompt's cache, then its response's)."""
        return PrefixCache(
            [
                (torch.cat([k, k_after], dim=2), torch.cat([v, v_after], dim=2))
                for (k, v), (k_after, v_after) in zip(self.key_values, after.key_values, strict=True)
            ],
            torch.cat([self.attention_mask.bool(), after.attention_mask.bool()], dim=1),
        )


@dataclass
class BlockCache:
    """Keys/values of every position of a sequence, for decoding the block that starts at `start`:
    a forward given it runs only the block's tokens, which attend to the cached keys of every other
    position and to their own fresh keys (Fast-dLLM's DualCache, Wu et al. 2025, arXiv:2505.22618).
    Approximate: the other positions' keys were computed before the block's tokens last changed."""

    sequence: PrefixCache
    start: int

    def select(self, rows: torch.Tensor) -> BlockCache:
        return BlockCache(self.sequence.select(rows), self.start)


@dataclass
class DiMoEOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [B, L, V]
    # Per MoE layer (dense layers have no router), in layer order:
    router_logits: tuple[torch.Tensor, ...] | None = None  # [B, L, E]
    router_probs: tuple[torch.Tensor, ...] | None = None  # [B, L, E], float32
    router_topk: tuple[torch.Tensor, ...] | None = None  # [B, L, k]
    prefix_cache: PrefixCache | None = None


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention then FFN: the MoE block, or one dense SwiGLU in `config.dense_layers`.
    Under `gradient_checkpointing_enable()` a training forward keeps only the layer's input and
    recomputes the rest in the backward (transformers' GradientCheckpointingLayer)."""

    def __init__(self, config: DiMoEConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.qk_norm,
            config.rms_norm_eps,
            config.attention_bias,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MoEBlock | SwiGLU = (
            SwiGLU(config.hidden_size, config.dense_intermediate_size)
            if index in config.dense_layers
            else MoEBlock(
                config.hidden_size,
                config.moe_intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                config.norm_topk_prob,
                config.shared_expert_intermediate_size,
                config.moe_dispatch,
                config.router_expert_bias,
            )
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], RouterOutput | None]:
        """The layer's output, its own keys/values, and its router's output (None if dense)."""
        attn, own_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv, start)
        x = x + attn
        hidden = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SwiGLU):
            return x + self.mlp(hidden), own_kv, None
        ffn, route = self.mlp(hidden)
        return x + ffn, own_kv, route


class DiMoEPreTrainedModel(PreTrainedModel):
    config_class = DiMoEConfig
    base_model_prefix = "dimoe"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.expert_bias is not None:
                init.zeros_(module.expert_bias)


class DiMoEVLModel(DiMoEPreTrainedModel):
    """The whole DiMoE-VL model; `AutoModel.from_pretrained(dir)` returns this class."""

    def __init__(self, config: DiMoEConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vision = (
            VisionTower(
                config.vision_config, config.hidden_size, config.vision_feature_layer, config.vision_pool_2x2
            )
            if config.vision_config
            else None
        )
        self.post_init()

    # -- parameter groups, for per-group learning rates and freezing -------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters split into `vision`, `projector`, `router` and `backbone`."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            g: [] for g in ("vision", "projector", "router", "backbone")
        }
        for name, param in self.named_parameters():
            if name.startswith("vision.encoder."):
                groups["vision"].append((name, param))
            elif name.startswith("vision.projector."):
                groups["projector"].append((name, param))
            elif ".mlp.gate." in name:
                groups["router"].append((name, param))
            else:
                groups["backbone"].append((name, param))
        return groups

    # -- inputs --------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] → image tokens [n, N, hidden]. Run once and pass as `image_features` to
        reuse the same features for several noised views of a sample."""
        if self.vision is None:
            raise ValueError("this DiMoE-VL model has no vision tower (vision_config is null)")
        return self.vision(pixel_values.to(self.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image-token positions replaced by the image features.

        Images are given for the rows that contain image tokens, in batch order, or for every row
        (rows without image tokens are then ignored)."""
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        if not is_image.any():
            return embeds
        features = self._image_rows_features(is_image, pixel_values, image_features)
        embeds = embeds.clone()
        embeds[is_image] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds

    def _image_rows_features(
        self,
        is_image: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None,
    ) -> torch.Tensor:
        """Image features [n, N, hidden] of the n rows of `is_image` [B, L] that hold image tokens,
        encoded from `pixel_values` unless given; checked to fill those rows' image tokens exactly."""
        rows_with_image = is_image.any(dim=1)
        batch = is_image.shape[0]
        if image_features is None:
            if pixel_values is None:
                raise ValueError(
                    "input_ids contain image tokens but neither pixel_values nor image_features given"
                )
            if pixel_values.shape[0] == batch:
                pixel_values = pixel_values[rows_with_image]
            image_features = self.encode_images(pixel_values)
        elif image_features.shape[0] == batch:
            image_features = image_features[rows_with_image]
        n_rows, n_tokens = int(rows_with_image.sum()), self.config.num_image_tokens
        if image_features.shape[:2] != (n_rows, n_tokens):
            raise ValueError(
                f"{n_rows} rows have image tokens and need [{n_rows}, {n_tokens}, hidden] image features, "
                f"got {tuple(image_features.shape)}"
            )
        if not torch.equal(
            is_image[rows_with_image].sum(dim=1), torch.full((n_rows,), n_tokens, device=is_image.device)
        ):
            raise ValueError(f"every row with an image must hold exactly {n_tokens} image tokens")
        return image_features

    def _cached_keys(
        self, real: torch.Tensor, prefix_cache: PrefixCache | None, block_cache: BlockCache | None
    ) -> tuple[torch.Tensor, int]:
        """The real-token mask of every key [B, Lk] (cached and own) and the index among them of the
        tokens' first own key, from the tokens' real-token mask `real` [B, L]."""
        if block_cache is not None:
            if prefix_cache is not None:
                raise ValueError("give at most one of prefix_cache and block_cache")
            return block_cache.sequence.attention_mask.bool(), block_cache.start
        if prefix_cache is None:
            return real, 0
        if self.config.attention not in ("prefix", "causal", "block"):
            raise ValueError(
                "a prefix cache is exact only for models with a `prefix`, `causal` or `block` mask"
            )
        prefix_real = prefix_cache.attention_mask.bool()
        return torch.cat([prefix_real, real], dim=1), prefix_real.shape[1]

    def _positions_and_mask(
        self,
        real: torch.Tensor,
        prefix_mask: torch.Tensor | None,
        key_real: torch.Tensor,
        start: int,
        cached: bool,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions [B, L] of the tokens, which are keys start..start+L-1 of `key_real`, and
        their attention mask over the keys; with `document_ids` (a packed row, never cached), each
        document's own, as if it were alone in its row."""
        positions = token_positions(key_real, document_ids)[:, start : start + real.shape[1]]
        # Beside a cache every token is a response token: it sees every real key.
        use_prefix = self.config.attention == "prefix" and prefix_mask is not None and not cached
        if self.config.attention == "block" and not cached:
            is_prefix = prefix_mask.bool() & real if prefix_mask is not None else torch.zeros_like(real)
            blocks = response_blocks(is_prefix, real, self.config.block_size, document_ids)
            copy = torch.where(blocks >= 0, CLEAN, PROMPT)
            mask = block_diffusion_mask(copy, blocks, copy, blocks, key_real)
        else:
            query_prefix = prefix_mask.bool() & real if use_prefix else None
            causal_from = start if self.config.attention == "causal" else None
            mask = build_attention_mask(key_real, query_prefix, query_prefix, causal_from, real.shape[1])
        return positions, within_documents(mask, document_ids)

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        prefix_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        prefix_cache: PrefixCache | None = None,
        return_prefix_cache: bool = False,
        block_cache: BlockCache | None = None,
        logits_positions: slice | None = None,
        position_ids: torch.Tensor | None = None,
        layout_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        **_: object,
    ) -> DiMoEOutput:
        """Logits for every position of `input_ids` [B, L] (or for `logits_positions` of them).

        attention_mask: [B, L] 1 for real tokens, 0 for padding (left padding expected).
        prefix_mask: [B, L] True for image + prompt tokens; used when `config.attention == "prefix"`
            (without it no token is prefix, i.e. full attention).
        prefix_cache: keys/values of an already-encoded prefix; `input_ids` is then only the part
            after it, and every token of it is a non-prefix token (it sees the prefix and itself).
        return_prefix_cache: return this call's keys/values as a `PrefixCache` (call it on the
            prefix alone, or on a whole sequence to make a `BlockCache`).
        block_cache: keys/values of a whole sequence; `input_ids` is then only its block at
            `block_cache.start` (response tokens, which see every real token), whose keys/values
            this call writes into the cache.
        logits_positions: the positions whose logits are wanted; the LM head, a vocabulary-wide
            matmul per position, then skips the others (a decoder reads one block of them).
        position_ids, layout_mask: RoPE positions [B, L] and a boolean mask [B, 1, L, L] that
            replace the ones the attention type gives (the block-diffusion training layout, whose
            noisy and clean copies of the response share positions).
        document_ids: [B, L] the packed document of each token (-1 on padding): each document then
            gets the mask and positions it would get alone (no cache).
        """
        real = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        key_real, first = self._cached_keys(real, prefix_cache, block_cache)
        cache = block_cache.sequence if block_cache is not None else prefix_cache
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids (packed rows) are for training forwards, not beside a cache")
        positions, mask = self._positions_and_mask(
            real, prefix_mask, key_real, first, cache is not None, document_ids
        )
        if layout_mask is not None:
            positions, mask = position_ids, layout_mask
        start = block_cache.start if block_cache is not None else None
        x = self.embed(input_ids, pixel_values, image_features)
        rotary_dim = int(self.config.head_dim * self.config.partial_rotary_factor)
        cos, sin = rope_cos_sin(positions, rotary_dim, self.config.rope_theta, x.dtype)
        routes: list[RouterOutput] = []
        own_kvs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            past = cache.key_values[i] if cache is not None else None
            x, own_kv, route = layer(x, cos, sin, mask, past, start)
            if route is not None:
                routes.append(route)
            own_kvs.append(own_kv)
        logits = self.lm_head(self.norm(x if logits_positions is None else x[:, logits_positions]))

        def per_layer(field: str) -> tuple[torch.Tensor, ...]:
            # The router sees tokens flattened to [B·L, ·]; callers index by [B, L].
            return tuple(getattr(route, field).reshape(*input_ids.shape, -1) for route in routes)

        return DiMoEOutput(
            logits=logits,
            router_logits=per_layer("logits"),
            router_probs=per_layer("probs"),
            router_topk=per_layer("topk_index"),
            prefix_cache=PrefixCache(own_kvs, real) if return_prefix_cache else None,
        )
