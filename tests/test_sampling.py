"""KV-cache sampling: parity with full recompute, filtering, seeds, compile caching, errors."""

import dataclasses

import jax
import numpy as np
import pytest

from chatgot_jax import sampling
from chatgot_jax.config import ModelConfig
from chatgot_jax.data import CharTokenizer
from chatgot_jax.errors import UserError
from chatgot_jax.model import param_shapes

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind.\n"
PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_text(TEXT)


def micro_cfg(tok, **kw):
    base = dict(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_head=4, d_hid=64,
                max_seq_length=64, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def random_params(cfg, seed):
    """Random float32 weights built in numpy (init_params is slow to run on a busy CPU).

    Larger than the init's 0.02 so that logits spread out (no near-ties for argmax).
    """
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1.0 + 0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
        std = 0.5 if "head" in name else 0.1
        return (std * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


@pytest.fixture(scope="module")
def model(tok):
    cfg = micro_cfg(tok)
    return cfg, random_params(cfg, 1)


@pytest.mark.parametrize("memory", [False, True])
def test_cached_greedy_matches_recompute(tok, model, memory):
    cfg, params = model
    if memory:
        cfg = micro_cfg(tok, memory=True)
        params = random_params(cfg, 2)
    prompt_ids = tok.encode(PROMPT)
    n = 50  # 13 + 50 < 64: no sliding
    ids, logits = sampling.generate_ids(params, cfg, prompt_ids, max_new_tokens=n,
                                        temperature=0.0, return_logits=True)
    ref_ids, ref_logits = sampling.generate_recompute(params, cfg, prompt_ids, max_new_tokens=n)
    assert ids.shape == (1, n) and logits.shape == (n, 1, cfg.vocab_size)
    np.testing.assert_array_equal(ids[0], ref_ids)
    np.testing.assert_allclose(logits[:, 0], ref_logits, atol=1e-4, rtol=1e-4)


def test_sliding_window_matches_recompute_with_same_rule(tok):
    """max_seq_length 16, 40 new tokens: exact equality with a recompute reference
    that applies the same re-prefill rule (restart from the last S - 1 tokens).
    Two greedy rows: the first prefill is one shared row, re-prefills run per row."""
    cfg = micro_cfg(tok, max_seq_length=16)
    params = random_params(cfg, 3)
    prompt_ids = tok.encode(TEXT[:20])  # longer than S - 1: cut to its last 15
    ids, logits = sampling.generate_ids(params, cfg, prompt_ids, max_new_tokens=40,
                                        temperature=0.0, num_samples=2, return_logits=True)
    ref_ids, ref_logits = sampling.generate_recompute(params, cfg, prompt_ids,
                                                      max_new_tokens=40)
    assert ids.shape == (2, 40)
    for row in range(2):
        np.testing.assert_array_equal(ids[row], ref_ids)
        np.testing.assert_allclose(logits[:, row], ref_logits, atol=1e-4, rtol=1e-4)
    text = sampling.generate(params, cfg, tok, TEXT[:20], max_new_tokens=40, temperature=0.0,
                             num_samples=2)
    assert text == [tok.decode(ref_ids)] * 2


def test_seeds_batches_and_top_k_1(tok, model):
    cfg, params = model
    kw = dict(max_new_tokens=40, temperature=1.0)
    a = sampling.generate(params, cfg, tok, PROMPT, seed=5, **kw)
    b = sampling.generate(params, cfg, tok, PROMPT, seed=5, **kw)
    c = sampling.generate(params, cfg, tok, PROMPT, seed=6, **kw)
    assert a == b and len(a) == 1 and len(a[0]) == 40
    assert a != c
    rows = sampling.generate(params, cfg, tok, PROMPT, seed=5, num_samples=2, **kw)
    assert len(rows) == 2 and len(set(rows)) == 2  # a different random stream per row
    greedy = sampling.generate(params, cfg, tok, PROMPT, max_new_tokens=40, temperature=0.0)
    top1 = sampling.generate(params, cfg, tok, PROMPT, seed=9, max_new_tokens=40,
                             temperature=1.0, top_k=1)
    assert top1 == greedy
    greedy2 = sampling.generate(params, cfg, tok, PROMPT, max_new_tokens=40, temperature=0.0,
                                num_samples=2)  # the shared one-row prefill, tiled
    assert greedy2 == greedy * 2


def test_streaming_pieces_join_to_result(tok, model):
    cfg, params = model
    pieces = {0: [], 1: []}
    out = sampling.generate(params, cfg, tok, PROMPT, max_new_tokens=45, num_samples=2,
                            on_text=lambda i, s: pieces[i].append(s))
    assert ["".join(pieces[0]), "".join(pieces[1])] == out
    assert len(pieces[0]) > 1  # streamed in several pieces


filter_jit = jax.jit(sampling.filter_logits)  # knobs traced: one compilation


def kept(logits, top_k, top_p):
    out = np.asarray(filter_jit(np.asarray([logits], np.float32), np.int32(top_k),
                                np.float32(top_p)))
    return set(np.flatnonzero(np.isfinite(out[0])).tolist())


def test_filter_logits_hand_made():
    logits = np.log([0.15, 0.5, 0.05, 0.3])  # by probability: 1, 3, 0, 2
    assert kept(logits, 0, 1.0) == {0, 1, 2, 3}
    assert kept(logits, 0, 0.8) == {1, 3}
    assert kept(logits, 0, 0.81) == {1, 3, 0}
    assert kept(logits, 0, 0.01) == {1}  # always at least the top token
    assert kept(logits, 2, 1.0) == {1, 3}
    assert kept(logits, 2, 0.9) == {1, 3}
    assert kept(logits, 3, 0.6) == {1, 3}  # top-p on the renormalised top-3
    assert kept(logits, 1, 1.0) == {1}
    assert kept(logits, 10, 1.0) == {0, 1, 2, 3}
    out = np.asarray(filter_jit(np.asarray([logits], np.float32), np.int32(2), np.float32(1)))
    np.testing.assert_allclose(out[0, [1, 3]], logits[[1, 3]], rtol=1e-6)


def test_sampling_respects_filter(tok, model):
    cfg, params = model
    ids, logits = sampling.generate_ids(params, cfg, tok.encode(PROMPT), max_new_tokens=40,
                                        temperature=1.0, top_k=3, num_samples=2,
                                        return_logits=True)
    top3 = np.argsort(-logits, axis=-1)[..., :3]  # (N, B, 3)
    assert all(ids[b, t] in top3[t, b] for b in range(2) for t in range(40))


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.9)])
def test_draws_are_jax_categorical_per_row_key(tok, model, top_k, top_p):
    """Token t of row b is jax.random.categorical(fold_in(key_b, t), filtered logits / T)."""
    cfg, params = model
    T, B, N = 0.7, 3, 40
    ids, logits = sampling.generate_ids(params, cfg, tok.encode(PROMPT), max_new_tokens=N,
                                        temperature=T, top_k=top_k, top_p=top_p, num_samples=B,
                                        seed=5, return_logits=True)
    keys_B = jax.random.split(jax.random.key(5), B)
    scaled = np.asarray(logits, np.float32) / np.float32(T)  # (N, B, V)
    for t in range(N):
        filtered = filter_jit(scaled[t], np.int32(top_k), np.float32(top_p))
        for b in range(B):
            want = jax.random.categorical(jax.random.fold_in(keys_B[b], t), filtered[b])
            assert ids[b, t] == int(want), (t, b)


def test_compiles_once_per_bucket(tok, model):
    """Prompts of other lengths in the same bucket and other knobs do not retrace."""
    cfg, params = model
    before = dict(sampling.trace_counts)

    def traces():
        return {k: sampling.trace_counts[k] - before.get(k, 0) for k in ("prefill", "decode")}

    sampling.generate(params, cfg, tok, "To", max_new_tokens=40, temperature=0.0)
    first = traces()
    assert first["prefill"] <= 1 and first["decode"] <= 1  # 0 if an earlier test compiled
    for prompt, kw in [("To be, or", {}), ("Whether 'tis", dict(temperature=0.7, top_k=5)),
                       ("is", dict(temperature=1.3, top_p=0.9, seed=3))]:
        sampling.generate(params, cfg, tok, prompt, max_new_tokens=37, **kw)
    assert traces() == first  # same bucket 16, batch 1: no new trace
    sampling.generate(params, cfg, tok, TEXT[:30], max_new_tokens=3)  # bucket 32
    assert traces() == {"prefill": first["prefill"] + 1, "decode": first["decode"]}


@pytest.mark.parametrize("prompt, kw, flag", [
    ("To ж be ß", {}, "'ß', 'ж'"),
    ("", {}, "empty"),
    (PROMPT, dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (PROMPT, dict(temperature=-1.0), "temperature must be >= 0"),
    (PROMPT, dict(top_p=0.0), "top_p must be in"),
    (PROMPT, dict(top_p=1.5), "top_p must be in"),
    (PROMPT, dict(top_k=-1), "top_k must be >= 0"),
    (PROMPT, dict(num_samples=0), "num_samples must be at least 1"),
])
def test_bad_inputs(tok, model, prompt, kw, flag):
    cfg, params = model
    args = {"max_new_tokens": 5, **kw}
    with pytest.raises(UserError, match=flag):
        sampling.generate(params, cfg, tok, prompt, **args)


def test_vocab_mismatch(tok, model):
    cfg, params = model
    other = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1)
    with pytest.raises(UserError, match="vocab_size"):
        sampling.generate(params, other, tok, PROMPT, max_new_tokens=5)
