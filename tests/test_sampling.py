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
                max_seq_length=64, dropout=0.0, matmul_dtype="float32")
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


def kept_rows(logits_RxV, top_k, top_p):
    """The kept token ids of each row, from one batched filter_logits call."""
    out = np.asarray(filter_jit(np.asarray(logits_RxV, np.float32), np.int32(top_k),
                                np.float32(top_p)))
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in out]


def test_top_p_applies_to_the_renormalised_top_k():
    """Top-p runs on the top-k tokens' probabilities renormalised to sum to 1, not on
    their share of the whole distribution: the renormalised masses are larger,
    so the nucleus can end sooner."""
    # [0.5, 0.3, 0.2], top-k 2 -> [0.625, 0.375]: the first token alone reaches 0.6.
    # Unrenormalised, the first holds 0.5 < 0.6, so the second would be kept too.
    logits = np.log([0.5, 0.3, 0.2])
    assert kept(logits, 2, 0.6) == {0}
    assert kept(logits, 0, 0.6) == {0, 1} and kept(logits, 2, 1.0) == {0, 1}  # each alone
    # Five tokens, top-k 3 -> [0.4, 0.333, 0.267]: the first two reach 0.7.
    # Unrenormalised, the first two hold 0.55 < 0.7 and the third would be kept.
    logits = np.log([0.3, 0.25, 0.2, 0.15, 0.1])
    assert kept(logits, 3, 0.7) == {0, 1}
    assert kept(logits, 0, 0.7) == {0, 1, 2}
    # With top-k off nothing is renormalised (the full distribution sums to 1).
    assert kept(logits, 0, 0.55) == {0, 1} and kept(logits, 0, 0.56) == {0, 1, 2}


def test_renormalised_nucleus_is_never_larger():
    """The reverse case does not exist: renormalising divides by the top-k mass
    (<= 1), so every token's preceding mass only grows and the nucleus can only
    shrink. On 256 random rows the filter keeps a subset of (top-k and the
    unrenormalised nucleus), a strict subset in some rows, and exactly the
    unrenormalised nucleus when top-k is off."""
    rng = np.random.default_rng(0)
    logits = (2.0 * rng.standard_normal((256, 12))).astype(np.float32)  # as the filter sees them
    ranked = -np.sort(-logits.astype(np.float64), axis=1)
    probs = np.exp(ranked - ranked[:, :1])
    probs /= probs.sum(axis=1, keepdims=True)  # over all 12 tokens: unrenormalised
    before = np.cumsum(probs, axis=1) - probs
    strict = 0
    for top_k, top_p in [(0, 0.5), (0, 0.9), (3, 0.5), (3, 0.8), (6, 0.9)]:
        n_keep = np.maximum((before < top_p).sum(axis=1), 1)
        if top_k:
            n_keep = np.minimum(n_keep, top_k)
        cut = ranked[np.arange(256), n_keep - 1]
        unrenormalised = [set(np.flatnonzero(row >= c).tolist()) for row, c in zip(logits, cut)]
        got = kept_rows(logits, top_k, top_p)
        assert all(g <= u for g, u in zip(got, unrenormalised))
        if not top_k:
            assert got == unrenormalised
        strict += sum(g < u for g, u in zip(got, unrenormalised))
    assert strict > 0


def test_filter_rows_cut_independently_and_keep_ties():
    """One call, several rows, top-k 3 and top-p 0.8: each row is cut where its own
    distribution says, and every logit equal to the last kept one is kept (the
    cut is a value, so exact ties at the cut survive, beyond k if need be)."""
    rows = np.array([
        np.log([0.9, 0.05, 0.03, 0.01, 0.01]),  # peaked: the top token alone
        np.log([0.6, 0.25, 0.1, 0.04, 0.01]),   # top-3 renormalised: 0.632 < 0.8 -> 2
        np.log([0.22, 0.21, 0.2, 0.19, 0.18]),  # flat: top-k binds, 3
        [3.0, 1.0, 1.0, 1.0, 0.0],   # top-3 [0.787, 0.106, 0.106]: 2 by rank, tie at 1.0 -> 4
        [2.0, 0.0, 0.0, -1.0, -1.0],  # top-3 [0.787, 0.106, 0.106]: 2 by rank, tie -> 3
        [2.0, 0.0, -0.01, -1.0, -1.0],  # the same without the exact tie -> 2
        [0.5, 0.5, 0.5, 0.5, 0.5],   # all tied: all kept
    ], np.float32)
    want = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2}, {0, 1}, {0, 1, 2, 3, 4}]
    assert kept_rows(rows, 3, 0.8) == want
    # The same rows with their columns shuffled: the cut follows the values.
    perm = np.array([3, 0, 4, 2, 1])
    assert kept_rows(rows[:, perm], 3, 0.8) == [
        {int(np.flatnonzero(perm == i)[0]) for i in w} for w in want]
    # Kept logits are returned unchanged; each row equals its own one-row call.
    out = np.asarray(filter_jit(rows, np.int32(3), np.float32(0.8)))
    np.testing.assert_array_equal(np.where(np.isfinite(out), out, 0.0),
                                  np.where(np.isfinite(out), rows, 0.0))
    assert [kept(row, 3, 0.8) for row in rows] == want
    # Ties at a plain top-k cut: top-1 of [1, 2, 2, 0] keeps both 2s.
    assert kept(np.array([1.0, 2.0, 2.0, 0.0]), 1, 1.0) == {1, 2}


def test_sample_logits_draws_only_kept_tokens_per_row():
    """300 draws per row (gen_index 0..299) of the rows above: each row's draws
    cover exactly its kept set (the least likely kept token has probability
    0.096, so ~29 draws are expected for it), and temperature 0 gives the
    row's first argmax whatever the filter."""
    rows = np.array([
        np.log([0.9, 0.05, 0.03, 0.01, 0.01]),
        np.log([0.22, 0.21, 0.2, 0.19, 0.18]),
        [3.0, 1.0, 1.0, 1.0, 0.0],
        [0.5, 0.5, 0.5, 0.5, 0.5],
    ], np.float32)
    keys = jax.random.split(jax.random.key(4), len(rows))
    draw = jax.jit(jax.vmap(sampling.sample_logits, in_axes=(None, None, 0, None, None, None)))
    knobs = (np.int32(3), np.float32(0.8))
    drawn = np.asarray(draw(rows, keys, np.arange(300, dtype=np.int32), np.float32(1.0), *knobs))
    assert drawn.shape == (300, len(rows))
    want = [{0}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3, 4}]
    assert [set(drawn[:, r].tolist()) for r in range(len(rows))] == want
    greedy = np.asarray(draw(rows, keys, np.arange(3, dtype=np.int32), np.float32(0.0), *knobs))
    assert (greedy == [0, 0, 0, 0]).all()


def numpy_nucleus(logits_V, top_k, top_p):
    """Independent top-k + top-p reference in float64 numpy.

    -> (filtered logits, the closest any preceding mass came to top_p). Sort
    descending, keep the top k, softmax them, keep the tokens whose preceding
    (strictly higher-ranked) mass is below top_p, at least one; then keep every
    logit >= the last kept one.
    """
    logits = np.asarray(logits_V, np.float64)
    ranked = np.sort(logits)[::-1]
    if top_k > 0:
        ranked = ranked[:top_k]
    probs = np.exp(ranked - ranked[0])
    probs /= probs.sum()
    preceding = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    n_keep = max(1, int(np.count_nonzero(preceding < top_p)))
    filtered = np.where(logits >= ranked[n_keep - 1], logits_V, -np.inf).astype(np.float32)
    return filtered, float(np.min(np.abs(preceding - top_p)))


categorical_jit = jax.jit(jax.random.categorical)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (0, 0.9), (3, 0.8)])
def test_top_p_draws_match_numpy_nucleus(tok, model, top_k, top_p):
    """Token t of row b is jax.random.categorical(fold_in(key_b, t), l) with l the
    step's logits filtered by numpy_nucleus (not by the code under test)."""
    cfg, params = model
    B, N, seed = 3, 40, 11
    ids, logits = sampling.generate_ids(params, cfg, tok.encode(PROMPT), max_new_tokens=N,
                                        temperature=1.0, top_k=top_k, top_p=top_p,
                                        num_samples=B, seed=seed, return_logits=True)
    keys_B = jax.random.split(jax.random.key(seed), B)
    changed = 0  # draws the filter changes: without it, these would differ
    margin = 1.0
    for t in range(N):
        for b in range(B):
            filtered, gap = numpy_nucleus(logits[t, b], top_k, top_p)
            margin = min(margin, gap)
            key = jax.random.fold_in(keys_B[b], t)
            want = int(categorical_jit(key, filtered))
            assert ids[b, t] == want, (t, b)
            changed += want != int(categorical_jit(key, logits[t, b]))
    assert changed > 0
    # No preceding mass came within 1e-5 of top_p, so float32 (and the code's
    # 1e-6 slack) against float64 cannot have put a cut in another place.
    assert margin > 1e-5


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
