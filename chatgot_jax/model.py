"""The ChatGoT decoder as Flax Linen modules (pure-functional: params are a pytree).

Shapes: B batch, T query length, S key length (T, or max_seq_length with a
KV cache), D d_model, H heads, K head dim, F d_hid, V vocab, L layers.

    logits_BxTxV = Decoder(cfg).apply({"params": params}, tokens_BxT)

The blocks are pre-LN like PyTorch's nn.TransformerDecoderLayer(norm_first=True):
    x = x + Dropout(SelfAttention(LN1(x)))
    x = x + Dropout(MemoryAttention(LNm(x), zeros))   # only with cfg.memory
    x = x + Dropout(Linear(Dropout(GELU(Linear(LN2(x))))))
and are stacked with nn.scan (params carry a leading L axis) inside nn.remat.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from chatgot_jax.config import ModelConfig

# Tags for remat="names": these outputs are saved, everything else recomputed.
SAVED_NAMES = ("qkv", "attn_out", "mlp_hidden")

REMAT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
}


def dropout(x, rate: float, rng):
    """Inverted dropout with masks from 16-bit random words.

    Two masks per 32-bit draw halve the cost of the PRNG (the dominant cost of
    dropout on CPU); the drop probability is round(rate * 65536) / 65536.
    """
    threshold = round(rate * 65536)
    if threshold == 0:
        return x
    n = x.size
    bits = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:n]
    keep = (halves >= threshold).reshape(x.shape)
    scale = jnp.asarray(65536 / (65536 - threshold), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def dense(features: int, cfg: ModelConfig, name: str, std: float = 0.02):
    return nn.Dense(features, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(std), name=name)


def layer_norm(cfg: ModelConfig, name: str):
    # Statistics in float32 whatever the compute dtype.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                        param_dtype=jnp.float32, force_float32_reductions=True, name=name)


def attend(cfg: ModelConfig, q_BxTxHxK, k, v, mask_BxTxS, drop_rng, kv_layout="bshk"):
    """Softmax attention in float32; dropout on the weights when drop_rng is given.

    k and v are (B, S, H, K) ("bshk", training) or (B, H, S, K) ("bhsk", the KV
    cache's layout, which makes one-token decoding read contiguous rows).
    """
    if cfg.attention == "dot_product":
        if kv_layout == "bhsk":
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q_BxTxHxK, k, v, mask=mask_BxTxS[:, None])
    scale = 1.0 / jnp.sqrt(jnp.float32(q_BxTxHxK.shape[-1]))
    scores_BxHxTxS = jnp.einsum(f"bthk,{kv_layout}->bhts", q_BxTxHxK, k,
                                preferred_element_type=jnp.float32) * scale
    scores_BxHxTxS = jnp.where(mask_BxTxS[:, None], scores_BxHxTxS, -1e30)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    if drop_rng is not None:
        probs_BxHxTxS = dropout(probs_BxHxTxS, cfg.dropout, drop_rng)
    return jnp.einsum(f"bhts,{kv_layout}->bthk", probs_BxHxTxS.astype(v.dtype), v)


class Block(nn.Module):
    """One pre-LN decoder layer; nn.scan calls it as ((x, cache), layer, index) -> ((x, cache), None).

    The whole (L, B, H, S, K) cache rides in the scan's carry and each layer
    updates its own slice in place, so decoding never copies the cache.
    """

    cfg: ModelConfig
    deterministic: bool

    def drop(self, x):
        if self.deterministic or self.cfg.dropout == 0.0:
            return x
        return dropout(x, self.cfg.dropout, self.make_rng("dropout"))

    def drop_rng(self):
        if self.deterministic or self.cfg.dropout == 0.0:
            return None
        return self.make_rng("dropout")

    @nn.compact
    def __call__(self, carry, layer, index):
        x_BxTxD, cache = carry
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        H, K = cfg.n_head, cfg.head_dim
        resid_std = 0.02 / (2 * cfg.n_layers) ** 0.5

        # Causal self-attention, with a fused q/k/v projection (PyTorch's in_proj).
        h = layer_norm(cfg, "ln1")(x_BxTxD)
        qkv_BxTx3D = checkpoint_name(dense(3 * D, cfg, "qkv")(h), "qkv")
        q, k, v = jnp.split(qkv_BxTx3D.reshape(B, T, 3 * H, K), 3, axis=2)  # (B, T, H, K)
        q_pos_T = index + jnp.arange(T)
        kv_layout = "bshk"
        if cache is not None:  # write this chunk at [layer, :, :, index:index + T]
            def write(c_LxBxHxSxK, new_BxTxHxK):
                new = new_BxTxHxK.transpose(0, 2, 1, 3)[None].astype(c_LxBxHxSxK.dtype)
                return jax.lax.dynamic_update_slice(c_LxBxHxSxK, new, (layer, 0, 0, index, 0))
            cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
            k, v = cache["k"][layer], cache["v"][layer]  # (B, H, S, K)
            kv_layout = "bhsk"
        k_pos_S = jnp.arange(k.shape[2] if kv_layout == "bhsk" else T)
        mask_TxS = k_pos_S[None, :] <= q_pos_T[:, None]
        mask_BxTxS = jnp.broadcast_to(mask_TxS, (B, T, k_pos_S.shape[0]))
        ctx = attend(cfg, q, k.astype(q.dtype), v.astype(q.dtype), mask_BxTxS,
                     self.drop_rng(), kv_layout)
        out = dense(D, cfg, "attn_out", resid_std)(ctx.reshape(B, T, D))
        x_BxTxD = x_BxTxD + self.drop(checkpoint_name(out, "attn_out"))

        if cfg.memory:
            x_BxTxD = x_BxTxD + self.drop(MemoryAttention(cfg, self.deterministic,
                                                          name="memory")(x_BxTxD))

        # MLP: D -> F -> D with GELU.
        h = layer_norm(cfg, "ln2")(x_BxTxD)
        h_BxTxF = checkpoint_name(dense(cfg.d_hid, cfg, "fc")(h), "mlp_hidden")
        h_BxTxF = self.drop(nn.gelu(h_BxTxF, approximate=cfg.gelu_approximate))
        out = dense(D, cfg, "proj", resid_std)(h_BxTxF)
        x_BxTxD = x_BxTxD + self.drop(out)
        return (x_BxTxD.astype(cfg.compute_dtype), cache), None


class MemoryAttention(nn.Module):
    """The original's cross-attention sublayer, attending to one zero memory vector.

    Its output never depends on the tokens (softmax over one key is 1); it is
    here for parameter and numerics parity with PyTorch, not for quality.
    """

    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        H, K = cfg.n_head, cfg.head_dim
        h = layer_norm(cfg, "ln")(x_BxTxD)
        memory_Bx1xD = jnp.zeros((B, 1, D), cfg.compute_dtype)
        q = dense(D, cfg, "q")(h).reshape(B, T, H, K)
        kv = dense(2 * D, cfg, "kv")(memory_Bx1xD).reshape(B, 1, 2 * H, K)
        k, v = jnp.split(kv, 2, axis=2)
        mask_BxTx1 = jnp.ones((B, T, 1), bool)
        drop_rng = None
        if not self.deterministic and cfg.dropout > 0.0:
            drop_rng = self.make_rng("dropout")
        ctx = attend(cfg, q, k, v, mask_BxTx1, drop_rng)
        return dense(D, cfg, "out")(ctx.reshape(B, T, D))


class Decoder(nn.Module):
    """Token + learned position embeddings, L scanned blocks, final LN, untied head."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, *, deterministic: bool = True, cache=None, index=0):
        """Returns float32 logits (B, T, V); with a cache, (logits, new_cache).

        index: position of tokens_BxT[:, 0] (the number of tokens already cached).
        """
        cfg = self.cfg
        T = tokens_BxT.shape[1]
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                         name="tok_emb")
        pos_emb = self.param("pos_emb", nn.initializers.normal(0.02),
                             (cfg.max_seq_length, cfg.d_model), jnp.float32)
        x_BxTxD = embed(tokens_BxT)
        if cfg.scale_embeddings:
            x_BxTxD = x_BxTxD * jnp.sqrt(jnp.float32(cfg.d_model))
        x_BxTxD = x_BxTxD + jax.lax.dynamic_slice_in_dim(pos_emb, index, T)[None]
        if not deterministic and cfg.dropout > 0.0:
            x_BxTxD = dropout(x_BxTxD, cfg.dropout, self.make_rng("dropout"))
        x_BxTxD = x_BxTxD.astype(cfg.compute_dtype)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICY[cfg.remat], prevent_cse=False)
        # Training without remat unrolls the layer loop (measured ~15% faster on
        # CPU). With remat it stays a loop: unrolled, XLA keeps every layer's
        # activations alive and remat saves no memory. Decoding keeps the loop too
        # (measured faster than unrolled: fewer per-layer weight copies).
        unroll = cfg.n_layers if cache is None and cfg.remat == "none" else 1
        stack = nn.scan(block, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast), length=cfg.n_layers, unroll=unroll)
        layers = jnp.arange(cfg.n_layers)
        (x_BxTxD, cache), _ = stack(cfg, deterministic, name="blocks")(
            (x_BxTxD, cache), layers, index)

        x_BxTxD = layer_norm(cfg, "ln_f")(x_BxTxD).astype(jnp.float32)
        head = nn.Dense(cfg.vocab_size, dtype=jnp.float32, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.normal(0.02), name="head")
        logits_BxTxV = head(x_BxTxD)
        return logits_BxTxV if cache is None else (logits_BxTxV, cache)


def init_cache(cfg: ModelConfig, batch_size: int) -> dict:
    """An empty KV cache: k and v of shape (L, B, H, max_seq_length, K)."""
    shape = (cfg.n_layers, batch_size, cfg.n_head, cfg.max_seq_length, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}


def init_params(cfg: ModelConfig, rng):
    """Float32 params pytree; jax.eval_shape(functools.partial(init_params, cfg), rng) allocates nothing."""
    tokens = jnp.zeros((1, min(8, cfg.max_seq_length)), jnp.int32)
    return jax.jit(lambda key: Decoder(cfg).init(key, tokens)["params"])(rng)


def param_shapes(cfg: ModelConfig):
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def cross_entropy(logits_BxTxV, targets_BxT):
    """Mean next-character loss in nats, in float32."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1))
