"""One generic Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over the paged KV cache.

Parameter names follow Hugging Face's (`model.layers.N.self_attn.o_proj.weight`, ...) except for two
fused projections: `qkv_proj` holds q_proj, k_proj, v_proj stacked along the output dim, and
`gate_up_proj` holds gate_proj, up_proj. `load_weights` copies the HF tensors into those slices.

Tokens are flattened across requests ([T] ids, no padding); the attention metadata in the
`ForwardContext` says which rows belong to which request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from helix_server.errors import UnsupportedModelError
from helix_server.layers.activation import SiluAndMul
from helix_server.layers.attention import Attention, ForwardContext
from helix_server.layers.linear import Linear
from helix_server.layers.norm import RMSNorm
from helix_server.layers.rotary import RotaryEmbedding
from helix_server.layers.vocab_embedding import VocabEmbedding
from helix_server.models.direct_children import DirectChildren
from helix_server.models.hf_config import ArchConfig

# HF projection name -> (our fused parameter's module name, shard index within it).
_STACKED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_SHARD_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class LlamaAttention(DirectChildren, nn.Module):
    """Self-attention block: fused qkv projection, optional q/k norm, RoPE, paged attention, o_proj."""

    DIRECT_CHILDREN = ("qkv_proj", "o_proj", "q_norm", "k_norm", "rotary", "attn")

    def __init__(self, arch: ArchConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = arch.q_size
        self.kv_size = arch.kv_size
        self.qkv_proj = Linear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.qkv_bias)
        self.o_proj = Linear(arch.q_size, arch.hidden_size, bias=arch.o_proj_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, eps=arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, eps=arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm
        self.rotary = rotary
        self.attn = Attention(
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim,
            layer_idx,
            sliding_window=arch.sliding_windows[layer_idx],
        )

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, head_dim]
        sin: torch.Tensor,  # [T, 1, head_dim]
        ctx: ForwardContext,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = hidden.shape[0]
        qkv_proj, o_proj, q_norm, k_norm, rotary, attn = self.direct()
        qkv = qkv_proj.forward(hidden, ctx.bulk_start)  # [T, q_size + 2 * kv_size]
        v = qkv[:, self.q_size + self.kv_size :]  # [T, kv_size] (view)
        if self.qk_norm:
            q = q_norm.forward(qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim))
            k = qkv[:, self.q_size : self.q_size + self.kv_size]
            k = k_norm.forward(k.view(num_tokens, self.num_kv_heads, self.head_dim))
            rotary.rotate_(q, cos, sin)  # [T, heads, d]
            rotary.rotate_(k, cos, sin)  # [T, kv_heads, d]
        else:
            # q and k are adjacent in qkv: rotate both head groups with one set of ops, in place.
            qk = qkv[:, : self.q_size + self.kv_size]
            qk = qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            rotary.rotate_(qk, cos, sin)  # [T, heads + kv_heads, d]
            q = qkv[:, : self.q_size]
            k = qkv[:, self.q_size : self.q_size + self.kv_size]
        out = attn.forward(q, k, v, ctx)  # [T, q_size]
        return o_proj.forward(out, ctx.bulk_start)


class LlamaMLP(DirectChildren, nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    DIRECT_CHILDREN = ("gate_up_proj", "act_fn", "down_proj")

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=arch.mlp_bias)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor, bulk_start: int | None = None) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        """`bulk_start`: the first row of long prompt chunks, if any (see `ForwardContext`)."""
        gate_up_proj, act_fn, down_proj = self.direct()
        gate_up = gate_up_proj.forward(x, bulk_start)  # [T, 2I]
        return down_proj.forward(act_fn.forward(gate_up), bulk_start)  # via [T, I]


class LlamaDecoderLayer(DirectChildren, nn.Module):
    """Pre-norm decoder layer; the residual stream is carried separately and added in place."""

    DIRECT_CHILDREN = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

    def __init__(self, arch: ArchConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_idx, rotary)
        self.mlp = LlamaMLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]: the previous layer's output (not yet added)
        residual: torch.Tensor | None,  # [T, hidden], None at the first layer
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_layernorm, self_attn, post_attention_layernorm, mlp = self.direct()
        if residual is None:
            residual = hidden
            hidden = input_layernorm.forward(hidden)
        else:
            hidden, residual = input_layernorm.forward(hidden, residual)
        hidden = self_attn.forward(hidden, cos, sin, ctx)
        hidden, residual = post_attention_layernorm.forward(hidden, residual)
        return mlp.forward(hidden, ctx.bulk_start), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, rotary) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over the paged KV cache.

    Build it on the `meta` device, materialise it uninitialised, then `load_weights` and
    `build_rope_cache` (see `helix_server.models.loader.load_model`).
    """

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.rotary = RotaryEmbedding(arch.rope, arch.head_dim, arch.max_position_embeddings)
        self.model = LlamaModel(arch, self.rotary)
        # Tied embeddings: no lm_head parameter at all, logits use the embedding matrix.
        self.lm_head = (
            None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, bias=False)
        )
        self._layers = list(self.model.layers)  # plain list: slicing it per step costs nothing

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.arch.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.arch.head_dim

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.arch.max_position_embeddings

    @property
    def dtype(self) -> torch.dtype:
        """The parameter dtype (also the KV cache's and the logits')."""
        return self.model.embed_tokens.dtype

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """Shape of one layer's key (or value) cache: [num_blocks, block_size, kv_heads, head_dim]."""
        return (num_blocks, block_size, self.arch.num_kv_heads, self.arch.head_dim)

    def build_rope_cache(
        self, device: torch.device | str, dtype: torch.dtype | None = None, max_positions: int | None = None
    ) -> None:
        """Compute the RoPE cos/sin table on `device` (in the model dtype unless `dtype` is given)."""
        dtype = self.dtype if dtype is None else dtype
        self.rotary.build_cache(device, dtype, max_positions)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        ctx: ForwardContext,
        num_layers: int | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        """Final-norm hidden states of every token; `num_layers` runs only the first N layers."""
        hidden = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary.lookup(positions)  # [T, 1, head_dim] each, shared by all layers
        residual = None
        for layer in self._layers[:num_layers]:
            hidden, residual = layer.forward(hidden, residual, cos, sin, ctx)
        if residual is None:  # num_layers == 0
            return self.model.norm(hidden)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        """Logits for the rows that need them, in the LM head's output dtype (the model dtype, or
        float32 from a head the loader chose to return float32)."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Copy HF-named tensors into our parameters (casting to their dtype/device).

        q/k/v and gate/up go into slices of the fused projections. `rotary_emb.inv_freq` buffers
        are ignored, and so is `lm_head.weight` when embeddings are tied. Raises
        `UnsupportedModelError` for unknown names, shape mismatches, or weights left missing.
        `progress(n)` is called after each tensor with the number consumed so far.
        """
        params = dict(self.named_parameters())
        pending = {self._hf_name(name, shard) for name in params for shard in self._shards_of(name)}
        unexpected: list[str] = []
        with torch.no_grad():
            for count, (hf_name, tensor) in enumerate(weights, start=1):
                if progress is not None:
                    progress(count)
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                if hf_name == "lm_head.weight" and self.lm_head is None:
                    continue
                name, shard = self._our_name(hf_name)
                if name not in params:
                    unexpected.append(hf_name)
                    continue
                target = self._shard_view(params[name], name, shard)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise UnsupportedModelError(
                        f"weight {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                pending.discard(hf_name)
        if unexpected:
            raise UnsupportedModelError(
                f"checkpoint has {len(unexpected)} weight(s) this {self.arch.architecture} does not use: "
                + ", ".join(sorted(unexpected)[:20])
            )
        if pending:
            raise UnsupportedModelError(
                f"checkpoint is missing {len(pending)} weight(s): " + ", ".join(sorted(pending)[:20])
            )

    @staticmethod
    def _our_name(hf_name: str) -> tuple[str, int | None]:
        """HF parameter name -> (our parameter name, shard index in a fused projection or None)."""
        parts = hf_name.split(".")
        if len(parts) >= 2 and parts[-2] in _STACKED_SHARDS:
            fused, shard = _STACKED_SHARDS[parts[-2]]
            return ".".join([*parts[:-2], fused, parts[-1]]), shard
        return hf_name, None

    @staticmethod
    def _shards_of(name: str) -> tuple[int | None, ...]:
        parts = name.split(".")
        fused = parts[-2] if len(parts) >= 2 else ""
        return tuple(range(len(_SHARD_NAMES[fused]))) if fused in _SHARD_NAMES else (None,)

    @staticmethod
    def _hf_name(name: str, shard: int | None) -> str:
        """Our parameter name (+ shard) -> the HF name that fills it."""
        if shard is None:
            return name
        parts = name.split(".")
        return ".".join([*parts[:-2], _SHARD_NAMES[parts[-2]][shard], parts[-1]])

    def _shard_view(self, param: torch.Tensor, name: str, shard: int | None) -> torch.Tensor:
        """The rows of `param` that shard `shard` fills (the whole tensor when unfused)."""
        if shard is None:
            return param
        if ".qkv_proj." in name:
            sizes = (self.arch.q_size, self.arch.kv_size, self.arch.kv_size)
        else:
            sizes = (self.arch.intermediate_size, self.arch.intermediate_size)
        return param.narrow(0, sum(sizes[:shard]), sizes[shard])
