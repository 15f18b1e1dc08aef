"""The ChatGoT decoder as Flax Linen modules (pure-functional: params are a pytree).

Shapes: B batch, T query length, S key length (T, or max_seq_length with a
KV cache), D d_model, H heads, K head dim, F d_hid, V vocab, L layers, N = B*H.

    logits_BxTxV = Decoder(cfg).apply({"params": params}, tokens_BxT)
    # Decoding with a KV cache runs the layers unstacked (see unstack_layers):
    logits, cache = Decoder(cfg, unstacked=True).apply(
        {"params": unstack_layers(params)}, tokens_BxT, cache=init_cache(cfg, B), index=0)

The blocks are pre-LN like PyTorch's nn.TransformerDecoderLayer(norm_first=True):
    x = x + Dropout(SelfAttention(LN1(x)))
    x = x + Dropout(MemoryAttention(LNm(x), zeros))   # only with cfg.memory
    x = x + Dropout(out_proj.bias)                    # ... and memory_length 0
    x = x + Dropout(Linear(Dropout(GELU(Linear(LN2(x))))))
and are stacked with nn.scan (params carry a leading L axis) inside nn.remat.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from chatgot_jax import cpu_tuning
from chatgot_jax.config import ModelConfig
from chatgot_jax.errors import UserError
from chatgot_jax.prng import random_bits

# Tags for remat="names": these outputs are saved, everything else recomputed.
SAVED_NAMES = ("qkv", "attn_out", "mlp_hidden")

# config.REMAT_POLICIES other than "none" -> jax.checkpoint policy.
REMAT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
}


def dropout(x, rate, rng):
    """Inverted dropout with masks from 16-bit random words.

    Two masks per 32-bit draw halve the cost of the PRNG (the dominant cost of
    dropout on CPU); the drop probability is round(rate * 65536) / 65536. The
    words are jax.random.bits(rng, ...) exactly, from prng.random_bits (faster).
    `rate` is a Python float, or a traced scalar (a sweep's per-run rate; 0 then
    leaves x unchanged, bit for bit).
    """
    if isinstance(rate, (int, float)):
        threshold = round(rate * 65536)
        if threshold == 0:
            return x
        scale = jnp.asarray(65536 / (65536 - threshold), x.dtype)
    else:
        threshold = jnp.round(jnp.asarray(rate, jnp.float32) * 65536)
        scale = (65536.0 / (65536.0 - threshold)).astype(x.dtype)
        threshold = threshold.astype(jnp.uint32)
    n = x.size
    bits = random_bits(rng, (n + 1) // 2)
    halves = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:n]
    keep = (halves >= threshold).reshape(x.shape)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def matmul_dtype(cfg: ModelConfig, backend: str | None = None) -> str:
    """The dtype of the dense layers' operands: the compute dtype when it is bfloat16,
    else cfg.matmul_dtype with auto resolved to bfloat16 on a CPU with AMX (YNNPACK
    taking XLA's products), float32 elsewhere.

    XLA:CPU's own dot has no bfloat16 x bfloat16 -> float32 product; YNNPACK runs it,
    on AMX ~4x faster than a float32 product (docs/performance.md).
    """
    if cfg.compute_dtype == "bfloat16":
        return "bfloat16"
    on_cpu = (backend or jax.default_backend()) == "cpu"
    ynn = on_cpu and cpu_tuning.ynn_dots_enabled()
    if cfg.matmul_dtype == "auto":
        return "bfloat16" if ynn and cpu_tuning.has_amx_bf16() else "float32"
    if cfg.matmul_dtype == "bfloat16" and on_cpu and not ynn:
        raise UserError("model.matmul_dtype=bfloat16 needs XLA:CPU's YNNPACK products, which "
                        "XLA_FLAGS turns off (xla_cpu_experimental_ynn_fusion_type): use "
                        "model.matmul_dtype=float32")
    return cfg.matmul_dtype


@jax.custom_vjp
def bf16_dense(x_xD, w_DxF, b_F):
    """x @ w + b with the product's operands rounded to bfloat16, accumulated and
    returned in float32. The gradients are products of the same kind, of the float32
    cotangent rounded to bfloat16, returned in float32 (the weight gradient is not
    rounded, unlike autocast's); the bias gradient too, as ones @ cotangent: XLA:CPU's
    own sum over the rows was ~6% of the default step (docs/performance.md)."""
    return _bf16_dense_fwd(x_xD, w_DxF, b_F)[0]


def _bf16_dot(a, b, spec):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _bf16_dense_fwd(x_xD, w_DxF, b_F):
    x, w = x_xD.astype(jnp.bfloat16), w_DxF.astype(jnp.bfloat16)
    return _bf16_dot(x, w, "...d,df->...f") + b_F, (x, w)


def _bf16_dense_bwd(saved, g_xF):
    x, w = saved
    g = g_xF.astype(jnp.bfloat16)
    g_NxF = g.reshape(-1, g.shape[-1])
    ones_N = jnp.ones(g_NxF.shape[:1], jnp.bfloat16)
    return (_bf16_dot(g, w, "...f,df->...d"), _bf16_dot(x, g, "...d,...f->df"),
            _bf16_dot(ones_N, g_NxF, "n,nf->f"))


bf16_dense.defvjp(_bf16_dense_fwd, _bf16_dense_bwd)


class BF16Dense(nn.Module):
    """nn.Dense's parameters (names, shapes, init) and float32 result, computed by
    bf16_dense (float32 inputs)."""

    features: int
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return bf16_dense(x, kernel, bias)


def dense(features: int, cfg: ModelConfig, name: str, std: float = 0.02):
    if cfg.compute_dtype == "float32" and matmul_dtype(cfg) == "bfloat16":
        return BF16Dense(features, nn.initializers.normal(std), name=name)
    return nn.Dense(features, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(std), name=name)


def layer_norm(cfg: ModelConfig, name: str):
    # Statistics in float32 whatever the compute dtype.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                        param_dtype=jnp.float32, force_float32_reductions=True, name=name)


def attention_impl(cfg: ModelConfig, cached: bool, backend: str | None = None) -> str:
    """The implementation one attention call uses: einsum, dot_product or cudnn.

    auto picks cuDNN's flash attention on a CUDA GPU for bfloat16 (or float16)
    compute with a head dim it supports (a multiple of 8, at most 128), einsum
    otherwise; KV-cache decoding (a query offset, not a plain causal mask) always
    uses einsum or dot_product.
    """
    impl = cfg.attention
    backend = backend or jax.default_backend()
    if impl == "auto":
        fits = (backend == "gpu" and cfg.compute_dtype in ("bfloat16", "float16")
                and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
        impl = "cudnn" if fits else "einsum"
    if impl == "cudnn" and backend != "gpu":
        raise UserError(f"model.attention=cudnn needs a CUDA GPU (the backend is {backend}): "
                        "use model.attention=auto")
    if impl == "cudnn" and cached:
        return "dot_product" if cfg.attention == "cudnn" else "einsum"
    return impl


def attend(cfg: ModelConfig, q_BxTxHxK, k, v, mask_TxS, drop_rng, cached=False, rate=None):
    """Softmax attention in float32 -> (B, T, H, K); dropout at `rate` on the weights
    when drop_rng is given.

    k and v are (B, S, H, K), or (N, S, K) when they come from the KV cache: the
    cache's layout, in which decoding one token reads contiguous rows.
    """
    B, T, H, K = q_BxTxHxK.shape
    impl = attention_impl(cfg, cached)
    if impl == "cudnn":  # causal self-attention of a whole window, T == S
        return jax.nn.dot_product_attention(q_BxTxHxK, k, v, is_causal=True,
                                            implementation="cudnn")
    if impl == "dot_product":
        if cached:
            k, v = (c.reshape(B, H, -1, K).transpose(0, 2, 1, 3) for c in (k, v))
        return jax.nn.dot_product_attention(q_BxTxHxK, k, v, mask=mask_TxS[None, None])
    if cached:  # heads folded into the batch axis, like the cache
        q = q_BxTxHxK.transpose(0, 2, 1, 3).reshape(B * H, T, K)
        qk, pv, mask = "ntk,nsk->nts", "nts,nsk->ntk", mask_TxS[None]
    else:
        q = q_BxTxHxK
        qk, pv, mask = "bthk,bshk->bhts", "bhts,bshk->bthk", mask_TxS[None, None]
    scale = 1.0 / jnp.sqrt(jnp.float32(K))
    scores = jnp.einsum(qk, q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)  # (B, H, T, S) or (N, T, S)
    if drop_rng is not None:
        probs = dropout(probs, rate, drop_rng)
    ctx = jnp.einsum(pv, probs.astype(v.dtype), v)
    if cached:
        ctx = ctx.reshape(B, H, T, K).transpose(0, 2, 1, 3)
    return ctx  # (B, T, H, K)


class Block(nn.Module):
    """One pre-LN decoder layer: (x_BxTxD, cache, index, rate) -> (x_BxTxD, cache).

    cache is None (training; nn.scan then sees carry x and outputs None) or this
    layer's {"k", "v"}, each (N, S, K): the chunk's keys and values are written
    at [:, index:index + T] in place and attention reads the whole cache, masked.
    rate is the dropout rate, None for none (see Decoder).
    """

    cfg: ModelConfig

    def drop(self, x, rate):
        return x if rate is None else dropout(x, rate, self.make_rng("dropout"))

    @nn.compact
    def __call__(self, x_BxTxD, cache, index, rate):
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        H, K = cfg.n_head, cfg.head_dim
        resid_std = 0.02 / (2 * cfg.n_layers) ** 0.5

        # Causal self-attention, with a fused q/k/v projection (PyTorch's in_proj).
        h = layer_norm(cfg, "ln1")(x_BxTxD)
        qkv_BxTx3D = checkpoint_name(dense(3 * D, cfg, "qkv")(h), "qkv")
        q, k, v = jnp.split(qkv_BxTx3D.reshape(B, T, 3 * H, K), 3, axis=2)  # (B, T, H, K)
        if cache is not None:
            def write(c_NxSxK, new_BxTxHxK):
                new_NxTxK = new_BxTxHxK.transpose(0, 2, 1, 3).reshape(B * H, T, K)
                return jax.lax.dynamic_update_slice(c_NxSxK, new_NxTxK.astype(c_NxSxK.dtype),
                                                    (0, index, 0))
            cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
            k, v = cache["k"], cache["v"]  # (N, S, K)
        S = T if cache is None else k.shape[1]
        mask_TxS = jnp.arange(S)[None, :] <= index + jnp.arange(T)[:, None]
        drop_rng = None if rate is None else self.make_rng("dropout")
        ctx = attend(cfg, q, k.astype(q.dtype), v.astype(q.dtype), mask_TxS, drop_rng,
                     cached=cache is not None, rate=rate)
        out = dense(D, cfg, "attn_out", resid_std)(ctx.reshape(B, T, D))
        x_BxTxD = x_BxTxD + self.drop(checkpoint_name(out, "attn_out"), rate)

        if cfg.memory:
            x_BxTxD = x_BxTxD + self.drop(MemoryAttention(cfg, name="memory")(x_BxTxD, rate),
                                          rate)

        # MLP: D -> F -> D with GELU.
        h = layer_norm(cfg, "ln2")(x_BxTxD)
        h_BxTxF = checkpoint_name(dense(cfg.d_hid, cfg, "fc")(h), "mlp_hidden")
        h_BxTxF = self.drop(nn.gelu(h_BxTxF, approximate=cfg.gelu_approximate), rate)
        out = dense(D, cfg, "proj", resid_std)(h_BxTxF)
        x_BxTxD = x_BxTxD + self.drop(out, rate)
        return x_BxTxD.astype(cfg.compute_dtype), cache


class MemoryAttention(nn.Module):
    """The original's cross-attention sublayer, attending to cfg.memory_length (1 or 0)
    zero memory vectors.

    Its output never depends on the tokens (softmax over one key is 1; over none,
    PyTorch's output is zero before out_proj); it is here for parameter and
    numerics parity with PyTorch, not for quality.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, rate=None):
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        H, K = cfg.n_head, cfg.head_dim
        S = cfg.memory_length
        h = layer_norm(cfg, "ln")(x_BxTxD)
        memory_BxSxD = jnp.zeros((B, S, D), cfg.compute_dtype)
        q = dense(D, cfg, "q")(h).reshape(B, T, H, K)
        kv = dense(2 * D, cfg, "kv")(memory_BxSxD).reshape(B, S, 2 * H, K)
        if S == 0:
            # No key to attend to: PyTorch's attention gives zeros, so the sublayer is
            # out_proj.bias. q and kv exist for the parameters (XLA drops their work).
            ctx = jnp.zeros((B, T, H, K), cfg.compute_dtype)
        else:
            k, v = jnp.split(kv, 2, axis=2)
            drop_rng = None if rate is None else self.make_rng("dropout")
            # Not a causal window: never the fused path (one key: probabilities 1).
            ctx = attend(dataclasses.replace(cfg, attention="einsum"), q, k, v,
                         jnp.ones((T, S), bool), drop_rng, rate=rate)
        return dense(D, cfg, "out")(ctx.reshape(B, T, D))


class Decoder(nn.Module):
    """Token + position embeddings (learned, or a fixed sinusoidal table), L scanned
    blocks, final LN, untied head (with or without bias).

    unstacked=True runs the layers as L separate modules block_0 .. block_{L-1}
    (params from unstack_layers) instead of one nn.scan over stacked weights: a
    scan slices (copies) each layer's weights out of the stack on every call,
    which dominated one-token decoding. It is the layout for KV-cache decoding.
    """

    cfg: ModelConfig
    unstacked: bool = False

    @nn.compact
    def __call__(self, tokens_BxT, *, deterministic: bool = True, cache=None, index=0,
                 dropout_rate=None):
        """Returns float32 logits (B, T, V); with a cache, (logits, new_cache).

        cache: from init_cache, only with unstacked=True.
        index: position of tokens_BxT[:, 0] (the number of tokens already cached).
        dropout_rate: a traced rate that replaces cfg.dropout (a sweep's per-run rate).
        """
        cfg = self.cfg
        T = tokens_BxT.shape[1]
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                         name="tok_emb")
        if cfg.position == "sinusoidal":  # a fixed table: no gradient (train_lib: no update)
            pos_emb = jax.lax.stop_gradient(self.param(
                "pos_emb", lambda _, shape, dtype: sinusoidal_table(*shape).astype(dtype),
                (cfg.max_seq_length, cfg.d_model), jnp.float32))
        else:
            pos_emb = self.param("pos_emb", nn.initializers.normal(0.02),
                                 (cfg.max_seq_length, cfg.d_model), jnp.float32)
        x_BxTxD = embed(tokens_BxT)
        if cfg.scale_embeddings:
            x_BxTxD = x_BxTxD * jnp.sqrt(jnp.float32(cfg.d_model))
        x_BxTxD = x_BxTxD + jax.lax.dynamic_slice_in_dim(pos_emb, index, T)[None]
        rate = None  # no dropout
        if not deterministic and (dropout_rate is not None or cfg.dropout > 0.0):
            rate = cfg.dropout if dropout_rate is None else dropout_rate
            x_BxTxD = dropout(x_BxTxD, rate, self.make_rng("dropout"))
        x_BxTxD = x_BxTxD.astype(cfg.compute_dtype)

        if self.unstacked:
            new_cache = []
            for i in range(cfg.n_layers):
                x_BxTxD, layer_cache = Block(cfg, name=f"block_{i}")(
                    x_BxTxD, None if cache is None else cache[i], index, rate)
                new_cache.append(layer_cache)
            cache = None if cache is None else tuple(new_cache)
        elif cache is not None:
            raise ValueError("a KV cache needs Decoder(cfg, unstacked=True) with "
                             "unstack_layers(params)")
        else:
            block = Block
            if cfg.remat != "none":
                block = nn.remat(Block, policy=REMAT_POLICY[cfg.remat], prevent_cse=False)
            # Without remat the layer loop is unrolled (faster on CPU). With remat it
            # stays a loop: unrolled, XLA keeps every layer's activations alive and
            # remat saves no memory.
            unroll = cfg.n_layers if cfg.remat == "none" else 1
            stack = nn.scan(block, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.n_layers,
                            unroll=unroll)
            x_BxTxD, _ = stack(cfg, name="blocks")(x_BxTxD, None, index, rate)

        x_BxTxD = layer_norm(cfg, "ln_f")(x_BxTxD).astype(jnp.float32)
        head = nn.Dense(cfg.vocab_size, use_bias=cfg.head_bias, dtype=jnp.float32,
                        param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                        name="head")
        logits_BxTxV = head(x_BxTxD)
        return logits_BxTxV if cache is None else (logits_BxTxV, cache)


def sinusoidal_table(length: int, d_model: int) -> np.ndarray:
    """The fixed position table of the original's first code: sin on even, cos on odd
    dimensions, frequency 10000^(-2i/d_model) for dimensions 2i and 2i+1 (float32)."""
    position_Lx1 = np.arange(length, dtype=np.float64)[:, None]
    angle = position_Lx1 * np.exp(np.arange(0, d_model, 2) * (-np.log(10000.0) / d_model))
    table = np.zeros((length, d_model))
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, :d_model // 2])
    return table.astype(np.float32)


def init_cache(cfg: ModelConfig, batch_size: int) -> tuple:
    """An empty KV cache: per layer, k and v of shape (B*H, max_seq_length, K).

    Heads are folded into the batch axis so that at batch 1 no size-1 axis
    stands between the in-place update and the attention reading it (with one,
    XLA copied each layer's cache on every decoded token).
    """
    shape = (batch_size * cfg.n_head, cfg.max_seq_length, cfg.head_dim)
    return tuple({"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
                 for _ in range(cfg.n_layers))


def unstack_layers(params) -> dict:
    """Params for Decoder(cfg, unstacked=True): the stacked "blocks" (leading L axis) as block_0 ... block_{L-1}."""
    blocks = params["blocks"]
    n_layers = jax.tree.leaves(blocks)[0].shape[0]
    out = {name: value for name, value in params.items() if name != "blocks"}
    for i in range(n_layers):
        out[f"block_{i}"] = jax.tree.map(lambda p: p[i], blocks)
    return out


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
