"""bfloat16 compute against float32 (logits, gradients, remat, KV-cache decoding),
and the dot_product attention path against the einsum one.

Every comparison runs on a micro model whose weights are moved well away from
the init (see `params`), so that the blocks, not the embeddings and the head
alone, shape the logits; the bf16 tolerance is derived from bf16's rounding
unit and checked against negative controls that it must notice.
"""

import functools

import jax
import numpy as np
import pytest

from chatgot_jax import model as M
from chatgot_jax import sampling, train_lib
from chatgot_jax.data import CharTokenizer
from conftest import micro_config

# bf16 keeps 8 significant bits (7 stored + the implicit one): round-to-nearest
# has a relative error of at most U = 2^-8 per rounding.
U = 2.0 ** -8

# Elementwise bf16-vs-fp32 logit tolerance, in units of U * std(fp32 logits).
# Derivation: with compute_dtype bfloat16 a value is rounded to bf16 about 11
# times per block (LN1 out, qkv, attention weights, context, attn_out, the
# residual add, LN2 out, fc, GELU, proj, the residual add), so ~24 times on the
# way through 2 blocks, the embedding cast and the final LN. Each rounding is
# uniform in +-U (std U/sqrt(3)); independent, they add up to a relative error
# of std sqrt(24/3) U ~ 2.8 U in the final hidden state. The head is float32
# and linear, so a logit's error has std ~2.8 U * std(logits), and the largest
# of the 4 x 32 x 96 = 12,288 logits compared sits ~sqrt(2 ln 12288) ~ 4.3 std
# out: ~12 U * std(logits) expected. The tolerance is twice that. (Measured on
# this model: 11.4 U * std at most, 1.7 U * std on average.)
LOGIT_TOL_UNITS = 24

# Gradient bounds, bf16 against fp32, per parameter leaf and over all leaves.
# The gradient inherits the forward's relative error (~2-3 U ~ 1%; measured
# 1.06% over all leaves, at most 1.9% for one leaf, the qkv bias): the norm of
# the difference may be at most 5% (~13 U) of the fp32 norm, and the cosine
# similarity at least 0.999 (measured >= 0.99983 for every leaf).
GRAD_REL_MAX = 0.05
GRAD_COS_MIN = 0.999

# float32 against float32 computed another way (dot_product vs einsum
# attention): at most 1e-5 of the array's largest magnitude, ~80 float32 ulps
# (2^-23 ~ 1.2e-7 relative), far below any bf16-sized (4e-3) difference.
# Measured on XLA:CPU: the two paths agree bit for bit.
FP32_REL_TOL = 1e-5

# The weights' random offset from the init (see `params`).
PERTURB_STD = 0.1


def cfg_with(*extra):
    """The micro config (vocab 96) without dropout, plus `extra` overrides."""
    return micro_config("model.dropout=0.0", *extra)


F32 = cfg_with()
BF16 = cfg_with("model.compute_dtype=bfloat16")
DOT = cfg_with("model.attention=dot_product")


@pytest.fixture(scope="module")
def params():
    """init_params, then N(0, PERTURB_STD^2) noise added to every leaf.

    At the init (std 0.02, residual projections 0.01) the logits are small
    (std 0.11) and all blocks together move them by only 12x the bf16
    tolerance (measured); with kernels of std ~0.1 over d_model 32 each single
    sublayer moves them by 28-49x (see test_bf16_tolerance_notices_each_sublayer).
    """
    init = M.init_params(F32.model, jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda p: (np.asarray(p) + PERTURB_STD * rng.standard_normal(p.shape)).astype(np.float32),
        init)


@pytest.fixture(scope="module")
def batch():
    """(x, y): 4 windows of the full context (32) with their next-token targets."""
    tokens = np.random.default_rng(1).integers(0, F32.model.vocab_size,
                                               (4, F32.model.max_seq_length + 1))
    tokens = tokens.astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


@functools.lru_cache(maxsize=None)
def forward(model_cfg):
    """Jitted logits(params, tokens), one compilation per model config."""
    return jax.jit(lambda p, x: M.Decoder(model_cfg).apply({"params": p}, x))


@functools.lru_cache(maxsize=None)
def grad_fn(cfg):
    """Jitted d loss_fn / d params (no dropout), one compilation per config."""
    return jax.jit(jax.grad(train_lib.loss_fn), static_argnums=1)


def logits_of(cfg, params, x):
    return np.asarray(forward(cfg.model)(params, x))


@pytest.fixture(scope="module")
def fp32_logits(params, batch):
    return logits_of(F32, params, batch[0])


@pytest.fixture(scope="module")
def fp32_grads(params, batch):
    return grad_fn(F32)(params, F32, *batch)


def logit_tolerance(ref):
    return LOGIT_TOL_UNITS * U * float(np.std(ref))


def test_bf16_logits_match_fp32_elementwise(params, batch, fp32_logits):
    bf16 = logits_of(BF16, params, batch[0])
    assert bf16.dtype == np.float32  # the head and the logits stay float32
    err = float(np.max(np.abs(bf16 - fp32_logits)))
    scale = float(np.std(fp32_logits))
    assert err <= logit_tolerance(fp32_logits), (err / (U * scale), "units of U * std")
    # bf16 was really in force: ~24 roundings each of up to U leave some logit
    # at least one unit off (with float32 compute the two would be identical).
    assert err > U * scale


def zeroed(params, sublayers, layers):
    """params with the output projections (kernel and bias) of `sublayers` in
    `layers` set to zero: those sublayers then add nothing to the residual stream."""
    out = jax.tree.map(np.copy, params)
    for name in sublayers:
        for leaf in ("kernel", "bias"):
            out["blocks"][name][leaf][list(layers)] = 0.0
    return out


@pytest.mark.parametrize("sublayers, layers", [
    (("attn_out", "proj"), (0, 1)),  # every block disabled
    (("attn_out",), (0,)), (("proj",), (0,)),  # one sublayer at a time
    (("attn_out",), (1,)), (("proj",), (1,)),
])
def test_bf16_tolerance_notices_each_sublayer(params, batch, fp32_logits, sublayers, layers):
    """Negative control: the bf16 comparison fails, by over 10x its tolerance, for
    a bf16 model missing a block or even one sublayer, so a tolerance this wide
    could not hide a broken block."""
    broken = logits_of(BF16, zeroed(params, sublayers, layers), batch[0])
    err = float(np.max(np.abs(broken - fp32_logits)))
    assert err > 10 * logit_tolerance(fp32_logits), err


def test_bf16_tolerance_rejects_constant_logits(fp32_logits):
    """Negative control: each position's mean logit everywhere (a uniform prediction)."""
    flat = np.broadcast_to(fp32_logits.mean(axis=-1, keepdims=True), fp32_logits.shape)
    assert np.max(np.abs(flat - fp32_logits)) > 10 * logit_tolerance(fp32_logits)


def cos_and_rel(a, b):
    """(cosine similarity, |a - b| / |a|) of two arrays (a the reference), flattened."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    norm = np.linalg.norm(a)
    return float(a @ b / (norm * np.linalg.norm(b))), float(np.linalg.norm(a - b) / norm)


def flat(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def test_bf16_gradients_match_fp32(params, batch, fp32_grads):
    bf16_grads = grad_fn(BF16)(params, BF16, *batch)
    assert all(g.dtype == np.float32 for g in jax.tree.leaves(bf16_grads))  # as the params
    leaves = jax.tree_util.tree_leaves_with_path(fp32_grads)
    assert len(leaves) == len(jax.tree.leaves(bf16_grads))
    for (path, ref), got in zip(leaves, jax.tree.leaves(bf16_grads)):
        cos, rel = cos_and_rel(ref, got)
        assert cos >= GRAD_COS_MIN and rel <= GRAD_REL_MAX, (jax.tree_util.keystr(path), cos, rel)
    cos, rel = cos_and_rel(flat(fp32_grads), flat(bf16_grads))
    assert cos >= GRAD_COS_MIN and rel <= GRAD_REL_MAX, (cos, rel)
    assert rel > 0  # bf16 was really in force


def test_gradient_bounds_notice_one_changed_token(params, batch, fp32_grads):
    """Negative control: fp32 gradients of the same batch with one of its 132 token
    ids changed (one input and one target) fail both bounds. (Measured: cosine
    0.9925, relative difference 0.12.)"""
    x, y = (a.copy() for a in batch)
    x[0, 5] = (x[0, 5] + 1) % F32.model.vocab_size
    y[0, 4] = x[0, 5]
    cos, rel = cos_and_rel(flat(fp32_grads), flat(grad_fn(F32)(params, F32, x, y)))
    assert cos < GRAD_COS_MIN and rel > GRAD_REL_MAX, (cos, rel)


# lr > 0 from step 0; the bounds below were measured at lr 2e-3.
TRAIN = ("train.warmup_steps=0", "train.lr=2e-3", "train.batch_size=4", "mesh.data=1")


@pytest.fixture(scope="module")
def train(params, batch):
    """train(*overrides) -> (params, [metrics per step]) after two steps of the jitted,
    sharded train step from `params`; each config is run once.

    Step 1 trains on `batch` (so its loss is the forward tests' loss), step 2 on
    4 other windows. The initial state is made once with create_sharded_state,
    our params swapped in (the optimizer state starts at zero whatever the
    params), and copied for each run: the step donates it, and the state's
    shapes and shardings do not depend on compute_dtype, remat or attention.
    """
    other = np.random.default_rng(2).integers(0, F32.model.vocab_size,
                                              (4, F32.model.max_seq_length + 1))
    other = other.astype(np.int32)
    steps = [batch, (other[:, :-1], other[:, 1:])]
    mesh = train_lib.make_mesh(cfg_with(*TRAIN).mesh)
    state, shardings = train_lib.create_sharded_state(cfg_with(*TRAIN), mesh)
    initial = {**jax.device_get(state), "params": params}
    runs = {}

    def run(*overrides):
        if overrides not in runs:
            cfg = cfg_with(*TRAIN, *overrides)
            step = train_lib.make_train_step(cfg, mesh, shardings)
            hyper = train_lib.train_hyperparams(cfg, mesh)
            state = jax.device_put(initial, shardings)
            metrics = []
            for x, y in steps:
                state, m = step(state, hyper, *train_lib.put_batch(mesh, x, y))
                metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            runs[overrides] = jax.device_get(state["params"]), metrics
        return runs[overrides]

    return run


def tree_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


def max_moved(new, old):
    return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), new, old)))


def forward_loss(cfg, params, batch):
    x, y = batch
    return float(M.cross_entropy(logits_of(cfg, params, x), y))


def test_bf16_train_step_remat_full_equals_none(params, batch, train):
    """remat="full" recomputes the forward in the backward pass; in bf16 the result is
    that of remat="none" up to where XLA rounds to bf16. With jax 0.10.2 on XLA:CPU the
    recomputation rounds exactly as the first pass did: params, losses and gradient
    norms after 2 steps are bit-equal. With jax 0.12 the fusions round elsewhere:
    losses 8.7e-5 and gradient norms 3.9e-4 relative apart at most, and Adam's first
    steps (about lr per element, whatever the gradient's size) turn that into a
    parameter difference 9.6% of the update's norm. The bounds below leave 10x / 3x.
    (float32 is not bit-equal either; test_model covers float32 remat.)"""
    p_none, m_none = train("model.compute_dtype=bfloat16", "model.remat=none")
    p_full, m_full = train("model.compute_dtype=bfloat16", "model.remat=full")
    for got, want in zip(m_full, m_none):
        assert got["opt_step"] == want["opt_step"] and got["lr"] == want["lr"]
        assert abs(got["loss"] - want["loss"]) <= 1e-3 * abs(want["loss"]), (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 5e-3 * want["grad_norm"], (got, want)
    update = jax.tree.map(lambda a, b: a - b, p_none, params)
    apart = jax.tree.map(lambda a, b: a - b, p_full, p_none)
    assert tree_norm(apart) <= 0.3 * tree_norm(update)
    if jax.__version_info__ < (0, 11):
        assert m_full == m_none
        jax.tree.map(np.testing.assert_array_equal, p_full, p_none)
    assert max_moved(p_none, params) > 1e-3  # the steps moved the params (lr 2e-3)
    # bf16 was in force: step 1 trained on `batch`, and its loss is off the fp32
    # forward's loss there by more than float32 programs ever differ (~1e-7
    # relative), though by less than 1% (measured: 1.5e-4 relative).
    loss, fp32 = m_none[0]["loss"], forward_loss(F32, params, batch)
    assert 1e-5 * fp32 < abs(loss - fp32) < 1e-2 * fp32, (loss, fp32)


# A vocabulary of the 95 printable ASCII characters: 96 ids with the unknown id 0,
# the micro config's vocab_size.
TOKENIZER = CharTokenizer("".join(chr(c) for c in range(32, 127)))


def test_bf16_cached_greedy_matches_recompute(params):
    """Greedy decoding in bf16 with the KV cache gives the text of full recompute.

    A 10-character prompt and 22 new tokens fill the 32-token context: a prefill,
    then 21 one-token decode steps, each reading a longer stretch of the cache.
    """
    cfg = BF16.model
    prompt, n = "JON SNOW: ", 22
    text = sampling.generate(params, cfg, TOKENIZER, prompt, max_new_tokens=n, temperature=0.0)
    ids, logits = sampling.generate_ids(params, cfg, TOKENIZER.encode(prompt), max_new_tokens=n,
                                        temperature=0.0, return_logits=True)
    ref_ids, ref_logits = sampling.generate_recompute(params, cfg, TOKENIZER.encode(prompt),
                                                      max_new_tokens=n)
    assert text == [TOKENIZER.decode(ref_ids)]
    np.testing.assert_array_equal(ids[0], ref_ids)
    assert len(set(ref_ids.tolist())) > 5  # not one repeated character
    # Both are bf16 evaluations of the same function; they may differ by the
    # bf16 tolerance at most. (Measured: 3e-7, i.e. only the float32 head's
    # rounding differs.)
    assert np.max(np.abs(logits[:, 0] - ref_logits)) <= logit_tolerance(ref_logits)


def test_dot_product_attention_is_the_path_taken(params, batch, monkeypatch):
    """model.attention="dot_product" calls jax.nn.dot_product_attention (in the
    stacked forward and in KV-cache decoding); "einsum" never does."""
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mask") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    x = batch[0]
    for cfg, expect in ((F32.model, False), (DOT.model, True)):
        calls.clear()
        jax.eval_shape(lambda p: M.Decoder(cfg).apply({"params": p}, x), params)
        assert bool(calls) == expect
        calls.clear()
        layers = M.unstack_layers(params)
        jax.eval_shape(lambda p: M.Decoder(cfg, unstacked=True).apply(
            {"params": p}, x[:, :3], cache=M.init_cache(cfg, x.shape[0]), index=0), layers)
        assert bool(calls) == expect
    assert all(calls)  # the causal mask is passed


def assert_fp32_close(got, want):
    """Elementwise within FP32_REL_TOL of want's largest magnitude."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_REL_TOL * np.max(np.abs(want)))


def test_dot_product_logits_and_gradients_match_einsum(params, batch, fp32_logits, fp32_grads):
    assert_fp32_close(logits_of(DOT, params, batch[0]), fp32_logits)
    jax.tree.map(assert_fp32_close, grad_fn(DOT)(params, DOT, *batch), fp32_grads)


def test_dot_product_train_steps_match_einsum(params, batch, train):
    p_dot, m_dot = train("model.attention=dot_product")
    p_ein, m_ein = train()
    np.testing.assert_allclose(m_dot[0]["loss"], forward_loss(F32, params, batch),
                               rtol=FP32_REL_TOL)  # the step trained on `batch`
    for a, b in zip(m_dot, m_ein):
        np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]],
                                   rtol=FP32_REL_TOL)
    jax.tree.map(assert_fp32_close, without_key_bias(p_dot), without_key_bias(p_ein))
    assert max_moved(p_dot, params) > 1e-3  # the steps moved the params


def without_key_bias(params):
    """params with the key third of the qkv bias zeroed. Its gradient is zero in exact
    arithmetic (q . b_k is the same for every key, and softmax ignores a constant), so
    the two paths' float32 rounding noise is all it gets, which Adam scales to steps of
    up to lr either way (up to 2.2e-4 apart here with YNNPACK's products)."""
    out = jax.tree.map(np.array, params)
    D = F32.model.d_model
    out["blocks"]["qkv"]["bias"][:, D:2 * D] = 0.0
    return out


def test_dot_product_cached_greedy_matches_einsum_recompute(params):
    """The dot_product path reading the KV cache (its own reshape of the cache's
    (B*H, S, K) layout) decodes what the einsum path computes by full recompute."""
    prompt = TOKENIZER.encode("ARYA: ")
    ids, logits = sampling.generate_ids(params, DOT.model, prompt, max_new_tokens=20,
                                        temperature=0.0, return_logits=True)
    ref_ids, ref_logits = sampling.generate_recompute(params, F32.model, prompt,
                                                      max_new_tokens=20)
    np.testing.assert_array_equal(ids[0], ref_ids)
    assert_fp32_close(logits[:, 0], ref_logits)


# --- bfloat16 products in a float32 model (model.matmul_dtype) ---------------------

MIXED = cfg_with("model.matmul_dtype=bfloat16")


def bf16_round(a):
    """a rounded to bfloat16, as float64 (for references)."""
    return np.asarray(jax.numpy.asarray(a, jax.numpy.bfloat16), np.float64)


def test_bf16_dense_and_its_gradients_are_products_of_rounded_operands():
    """bf16_dense's value and its three gradients are float32-accumulated products of
    bfloat16-rounded operands (the cotangent rounded too), against float64 references;
    the gradients come back in float32 without a second rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 48)).astype(np.float32)
    w = rng.standard_normal((48, 24)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    g = rng.standard_normal((2, 5, 24)).astype(np.float32)
    y, vjp = jax.vjp(M.bf16_dense, x, w, b)
    dx, dw, db = vjp(g)
    xr, wr, gr = bf16_round(x), bf16_round(w), bf16_round(g)
    for got, want in ((y, xr @ wr + b), (dx, gr @ wr.T), (dw, np.einsum("btd,btf->df", xr, gr)),
                      (db, gr.sum(axis=(0, 1)))):
        assert got.dtype == np.float32
        assert_fp32_close(got, want)
    # Negative control: the float32 product of the unrounded operands is farther off
    # than float32 accumulation explains.
    assert np.max(np.abs(x.astype(np.float64) @ w - xr @ wr)) > 1e-2


def test_bf16_dense_has_dense_params():
    """The same parameter names, shapes and initial values as nn.Dense: a run's params
    do not depend on where it started."""
    mixed = M.init_params(MIXED.model, jax.random.key(0))
    plain = M.init_params(F32.model, jax.random.key(0))
    assert jax.tree.structure(mixed) == jax.tree.structure(plain)
    jax.tree.map(np.testing.assert_array_equal, mixed, plain)


def test_bf16_matmul_logits_and_gradients_match_fp32(params, batch, fp32_logits, fp32_grads):
    """Rounding only the dense layers' operands (4 products per block, the head stays
    float32) stays within the bounds derived above for bfloat16 compute, which rounds
    more often; the logits stay float32 and differ from float32's (bf16 in force)."""
    logits = logits_of(MIXED, params, batch[0])
    assert logits.dtype == np.float32
    err = float(np.max(np.abs(logits - fp32_logits)))
    assert U * float(np.std(fp32_logits)) < err <= logit_tolerance(fp32_logits), err
    cos, rel = cos_and_rel(flat(fp32_grads), flat(grad_fn(MIXED)(params, MIXED, *batch)))
    assert cos >= GRAD_COS_MIN and 0 < rel <= GRAD_REL_MAX, (cos, rel)


def test_bf16_matmul_train_steps_track_fp32(params, batch, train):
    """Two train steps with bfloat16 products: the same loss as float32 to bf16's
    precision, and the params moved."""
    p_mix, m_mix = train("model.matmul_dtype=bfloat16")
    p_f32, m_f32 = train()
    for a, b in zip(m_mix, m_f32):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=4 * U)
    assert max_moved(p_mix, params) > 1e-3


@pytest.mark.parametrize("backend, amx, flags, compute, want", [
    ("cpu", True, "", "float32", "bfloat16"),  # XLA's default YNNPACK types include dots
    ("cpu", True, "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
     "float32", "bfloat16"),
    ("cpu", True, "--xla_cpu_experimental_ynn_fusion_type=", "float32", "float32"),
    ("cpu", False, "", "float32", "float32"),
    ("gpu", True, "", "float32", "float32"),
    ("cpu", True, "", "bfloat16", "bfloat16"),
    ("gpu", False, "", "bfloat16", "bfloat16"),
])
def test_auto_matmul_dtype(monkeypatch, backend, amx, flags, compute, want):
    monkeypatch.setattr(M.cpu_tuning, "has_amx_bf16", lambda: amx)
    monkeypatch.setenv("XLA_FLAGS", flags)
    cfg = cfg_with(f"model.compute_dtype={compute}", "model.matmul_dtype=auto").model
    assert M.matmul_dtype(cfg, backend) == want


def test_bf16_matmul_without_ynnpack_products_is_a_user_error(monkeypatch):
    """XLA:CPU's own dot has no bfloat16 x bfloat16 -> float32 product: asked for while
    XLA_FLAGS turns YNNPACK's off, one clear error instead of XLA's UNIMPLEMENTED."""
    monkeypatch.setenv("XLA_FLAGS", "--a=1 --xla_cpu_experimental_ynn_fusion_type=")
    with pytest.raises(M.UserError, match="matmul_dtype=float32"):
        M.matmul_dtype(MIXED.model, "cpu")
    assert M.matmul_dtype(MIXED.model, "gpu") == "bfloat16"


def test_decoding_takes_float32_products_for_auto(params, monkeypatch):
    """KV-cache decoding reads auto as float32 even where training would take bfloat16
    products (an AMX CPU): the same logits as float32's, bit for bit; bfloat16's differ."""
    monkeypatch.setattr(M.cpu_tuning, "has_amx_bf16", lambda: True)
    prompt = TOKENIZER.encode("ARYA: ")

    def logits(cfg):
        return sampling.generate_ids(params, cfg.model, prompt, max_new_tokens=8,
                                     temperature=0.0, return_logits=True)[1]

    auto = cfg_with("model.matmul_dtype=auto")
    assert M.matmul_dtype(auto.model, "cpu") == "bfloat16"  # what training would take
    np.testing.assert_array_equal(logits(auto), logits(F32))
    assert np.max(np.abs(logits(MIXED) - logits(F32))) > 0


def test_bf16_products_under_vmap(params, batch):
    """A sweep's vmapped runs batch the products over runs: the same gradients as each
    run's own, to float32 rounding."""
    half = jax.tree.map(lambda p: 0.5 * p, params)
    both = jax.tree.map(lambda a, b: np.stack([a, b]), params, half)
    vmapped = jax.jit(jax.vmap(lambda p: jax.grad(train_lib.loss_fn)(p, MIXED, *batch)))(both)
    for i, p in enumerate((params, half)):
        alone = grad_fn(MIXED)(p, MIXED, *batch)
        cos, rel = cos_and_rel(flat(alone), flat(jax.tree.map(lambda g: g[i], vmapped)))
        assert rel <= 1e-5, (i, cos, rel)
