"""The decoder: shapes, parameter accounting, causality, remat, precision, dropout, memory."""

import dataclasses
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from chatgot_jax import model as M
from chatgot_jax.config import REMAT_POLICIES, ModelConfig
from chatgot_jax.tools.params import count_params
from conftest import MICRO


def closed_form_params(c: ModelConfig) -> int:
    """Independent count: embeddings + L * (attention + MLP + 2 LN [+ memory]) + LN + head."""
    d, f, v, L = c.d_model, c.d_hid, c.vocab_size, c.n_layers
    attn = 4 * d * d + 4 * d
    mlp = 2 * d * f + f + d
    memory = (4 * d * d + 4 * d + 2 * d) if c.memory else 0
    head_bias = v if c.head_bias else 0
    return (v * d + c.max_seq_length * d + L * (attn + mlp + 4 * d + memory) + 2 * d + d * v
            + head_bias)


@pytest.mark.parametrize("shape", [
    dict(MICRO), dict(MICRO, n_layers=3, d_hid=48, vocab_size=96),
    dict(d_model=256, n_layers=4, n_head=4, d_hid=1024, max_seq_length=256),
    dict(d_model=768, n_layers=12, n_head=12, d_hid=3072, max_seq_length=1024),
])
@pytest.mark.parametrize("memory, numerics", [
    (False, {}), (True, {}),
    (True, dict(memory_length=0, head_bias=False)),  # the original's craft layout
    (False, dict(position="sinusoidal")),  # its seed layout (the fixed table is a leaf too)
])
def test_param_count_matches_closed_form(shape, memory, numerics):
    cfg = ModelConfig(**shape, memory=memory, **numerics)
    counts = count_params(cfg)
    assert sum(counts.values()) == closed_form_params(cfg)
    assert (counts["memory"] > 0) == memory


def test_design_doc_figures():
    small = dict(d_model=768, n_layers=12, n_head=12, d_hid=3072, max_seq_length=1024)
    assert sum(count_params(ModelConfig(**small)).values()) == 85_989_984
    assert sum(count_params(ModelConfig(**small, memory=True)).values()) == 114_356_832
    tiny_doc = dict(d_hid=1024, max_seq_length=256)  # configs/tiny-doc.yaml's shape
    assert sum(count_params(ModelConfig(**tiny_doc)).values()) == 3_274_336  # vocab 96
    assert sum(count_params(ModelConfig()).values()) == 2_174_560  # tiny: d_hid 512, context 64


def test_params_cli_last_line(capsys):
    from chatgot_jax.tools.params import main
    main(["--variant", "small", "--memory"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "total: 114356832"


def _tokens(cfg, B=2, T=None, seed=0):
    T = T or cfg.max_seq_length
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


@pytest.fixture(scope="module")
def params():
    return M.init_params(ModelConfig(**MICRO), jax.random.key(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(params, dtype):
    cfg = ModelConfig(**MICRO, compute_dtype=dtype)
    logits = jax.jit(M.Decoder(cfg).apply)({"params": params}, _tokens(cfg, B=3, T=11))
    assert logits.shape == (3, 11, cfg.vocab_size) and logits.dtype == jnp.float32
    leaves = jax.tree.leaves(params)
    assert all(x.dtype == jnp.float32 for x in leaves)
    assert params["blocks"]["qkv"]["kernel"].shape == (cfg.n_layers, 32, 96)  # stacked by scan


@pytest.mark.parametrize("remat", REMAT_POLICIES)
def test_causal(params, remat):
    cfg = ModelConfig(**MICRO, remat=remat)
    tokens = _tokens(cfg, B=1)
    t = 13
    changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
    f = jax.jit(lambda tok: M.Decoder(cfg).apply({"params": params}, tok))
    a, b = f(tokens), f(changed)
    np.testing.assert_array_equal(a[0, :t], b[0, :t])
    assert np.abs(a[0, t:] - b[0, t:]).max(axis=-1).min() > 0  # every later position sees it


def primitives(jaxpr) -> set[str]:
    """Names of all primitives in a jaxpr, inside scans and other sub-jaxprs too."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= primitives(sub)
    return names


def _loss_and_grads(cfg, params, tokens):
    def loss(p):
        logits = M.Decoder(cfg).apply({"params": p}, tokens[:, :-1], deterministic=False,
                                      rngs={"dropout": jax.random.key(3)})
        return M.cross_entropy(logits, tokens[:, 1:])
    return loss


REMAT_NAMES = {"checkpoint", "remat2"}  # jax.checkpoint's primitive, by jax version


@pytest.fixture(scope="module")
def no_remat(params):
    """Loss and grads without remat, computed once for all policies."""
    tokens = _tokens(ModelConfig(**MICRO), B=2, T=17)
    base = _loss_and_grads(ModelConfig(**MICRO), params, tokens)
    assert not REMAT_NAMES & primitives(jax.make_jaxpr(jax.grad(base))(params).jaxpr)
    return tokens, jax.jit(jax.value_and_grad(base))(params)


@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"])
def test_remat_is_in_jaxpr_and_changes_nothing(params, no_remat, remat):
    tokens, (l0, g0) = no_remat
    rematted = _loss_and_grads(ModelConfig(**MICRO, remat=remat), params, tokens)
    assert REMAT_NAMES & primitives(jax.make_jaxpr(jax.grad(rematted))(params).jaxpr)
    l1, g1 = jax.jit(jax.value_and_grad(rematted))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_bfloat16_close_to_float32(params):
    tokens = _tokens(ModelConfig(**MICRO), B=4)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = ModelConfig(**MICRO, compute_dtype=dtype)
        logits = jax.jit(M.Decoder(cfg).apply)({"params": params}, tokens[:, :-1])
        losses[dtype] = float(M.cross_entropy(logits, tokens[:, 1:]))
    # Stated tolerance: bf16 compute moves the loss by under 1% on random weights.
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.01 * losses["float32"]
    assert losses["bfloat16"] != losses["float32"]  # bf16 really was used


def test_eval_deterministic_train_mode_random(params):
    cfg = ModelConfig(**MICRO)
    tokens = _tokens(cfg)
    apply = jax.jit(lambda key, det: M.Decoder(cfg).apply(
        {"params": params}, tokens, deterministic=det, rngs={"dropout": key}),
        static_argnums=1)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(apply(k1, True), apply(k2, True))
    np.testing.assert_array_equal(apply(k1, False), apply(k1, False))
    assert not np.allclose(apply(k1, False), apply(k2, False))
    assert not np.allclose(apply(k1, False), apply(k1, True))


def test_dropout_rate_and_scale():
    x = jnp.ones((1000, 1000))
    y = M.dropout(x, 0.1, jax.random.key(0))
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.1) < 0.002
    assert abs(float(jnp.mean(y)) - 1.0) < 0.005  # inverted scaling keeps the mean
    values = np.unique(np.asarray(y))
    np.testing.assert_allclose(values, [0.0, 65536 / (65536 - 6554)], rtol=1e-6)
    assert M.dropout(x, 0.0, jax.random.key(0)) is x


@pytest.mark.parametrize("n", [1, 7, 4096 + 3])
def test_fast_random_bits_equal_jax_random_bits(n):
    from chatgot_jax.prng import random_bits
    for key in (jax.random.key(0), jax.random.key(12345), jax.random.fold_in(jax.random.key(1), 9)):
        want = jax.random.bits(key, (n,), jnp.uint32)
        np.testing.assert_array_equal(jax.jit(random_bits, static_argnums=1)(key, n), want)
    rbg = jax.random.key(0, impl="rbg")  # other key implementations fall back to JAX
    np.testing.assert_array_equal(random_bits(rbg, n), jax.random.bits(rbg, (n,), jnp.uint32))


def test_fast_fold_in_and_categorical_equal_jax():
    from chatgot_jax import prng
    fold_in, categorical = jax.jit(prng.fold_in), jax.jit(prng.categorical)
    for seed in range(20):
        key = jax.random.key(seed)
        for data in (0, 1, 77, 2 ** 31 + 5):
            want = jax.random.key_data(jax.random.fold_in(key, np.uint32(data)))
            np.testing.assert_array_equal(jax.random.key_data(fold_in(key, np.uint32(data))), want)
        logits = 3.0 * jax.random.normal(jax.random.key(1000 + seed), (96,))
        assert int(categorical(key, logits)) == int(jax.random.categorical(key, logits))
    rbg = jax.random.key(0, impl="rbg")  # other key implementations fall back to JAX
    np.testing.assert_array_equal(jax.random.key_data(prng.fold_in(rbg, 3)),
                                  jax.random.key_data(jax.random.fold_in(rbg, 3)))


def test_memory_sublayer_ignores_tokens():
    cfg = ModelConfig(**MICRO, memory=True)
    layer = M.MemoryAttention(cfg)
    x1 = jax.random.normal(jax.random.key(1), (2, 7, cfg.d_model))
    x2 = jax.random.normal(jax.random.key(2), (2, 7, cfg.d_model))
    variables = layer.init(jax.random.key(0), x1)
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # non-zero biases too
    apply = jax.jit(layer.apply)
    out1, out2 = apply(variables, x1), apply(variables, x2)
    np.testing.assert_allclose(out1, out2, rtol=1e-6)
    np.testing.assert_allclose(out1[0, 0], out1[1, 6], rtol=1e-6)
    p = variables["params"]  # = out(v(0)) = W_o b_v + b_o
    b_v = p["kv"]["bias"][cfg.d_model:]
    np.testing.assert_allclose(out1[0, 0], b_v @ p["out"]["kernel"] + p["out"]["bias"],
                               rtol=1e-5)


@pytest.mark.parametrize("memory", [False, True])
def test_kv_cache_matches_full_forward(memory):
    cfg = ModelConfig(**MICRO, memory=memory)
    params = M.init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg, T=20)
    layers = M.unstack_layers(params)
    assert layers["block_1"]["qkv"]["kernel"].shape == (32, 96) and "blocks" not in layers
    apply = jax.jit(lambda tok, cache, index: M.Decoder(cfg, unstacked=True).apply(
        {"params": layers}, tok, cache=cache, index=index))
    full = jax.jit(lambda tok: M.Decoder(cfg).apply({"params": params}, tok))(tokens)
    unstacked = M.Decoder(cfg, unstacked=True).apply({"params": layers}, tokens)
    np.testing.assert_allclose(unstacked, full, atol=1e-5)  # same model, layers unrolled
    prefill, cache = apply(tokens[:, :12], M.init_cache(cfg, 2), 0)
    np.testing.assert_allclose(prefill, full[:, :12], atol=1e-5)
    for t in range(12, 20):
        step, cache = apply(tokens[:, t:t + 1], cache, t)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
    with pytest.raises(ValueError, match="unstacked"):
        M.Decoder(cfg).apply({"params": params}, tokens, cache=M.init_cache(cfg, 2))


def test_init_std_and_untied_head(params):
    cfg = ModelConfig(**MICRO)
    assert math.isclose(float(jnp.std(params["tok_emb"]["embedding"])), 0.02, rel_tol=0.2)
    assert "head" in params and params["head"]["bias"].shape == (cfg.vocab_size,)
    proj_std = float(jnp.std(params["blocks"]["proj"]["kernel"]))
    assert proj_std < 0.02 / math.sqrt(2 * cfg.n_layers) * 1.3  # scaled residual init


def test_gelu_and_embedding_scale_flags(params):
    tokens = _tokens(ModelConfig(**MICRO), T=9)
    outs = [jax.jit(M.Decoder(dataclasses.replace(ModelConfig(**MICRO), **kw)).apply)(
        {"params": params}, tokens) for kw in ({}, {"gelu_approximate": True},
                                               {"scale_embeddings": True})]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[2])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-2)  # tanh GELU is close to erf


def test_attention_choice_by_backend_dtype_and_shape():
    """auto: cuDNN flash attention only on a GPU, in bfloat16, with a head dim it takes."""
    from chatgot_jax.errors import UserError
    from chatgot_jax.model import attention_impl

    bf16 = ModelConfig(**MICRO, compute_dtype="bfloat16")  # head dim 8
    assert attention_impl(bf16, cached=False, backend="cpu") == "einsum"
    assert attention_impl(bf16, cached=False, backend="gpu") == "cudnn"
    assert attention_impl(bf16, cached=True, backend="gpu") == "einsum"  # KV-cache decoding
    fp32 = dataclasses.replace(bf16, compute_dtype="float32")
    assert attention_impl(fp32, cached=False, backend="gpu") == "einsum"
    odd = dataclasses.replace(bf16, d_model=36)  # head dim 9
    assert attention_impl(odd, cached=False, backend="gpu") == "einsum"
    wide = dataclasses.replace(bf16, d_model=1024, n_head=4)  # head dim 256
    assert attention_impl(wide, cached=False, backend="gpu") == "einsum"
    explicit = dataclasses.replace(bf16, attention="cudnn")
    assert attention_impl(explicit, cached=True, backend="gpu") == "dot_product"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        attention_impl(explicit, cached=False, backend="cpu")
    for impl in ("einsum", "dot_product"):
        chosen = dataclasses.replace(bf16, attention=impl)
        assert attention_impl(chosen, cached=False, backend="gpu") == impl
