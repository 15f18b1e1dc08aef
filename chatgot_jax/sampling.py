"""Autoregressive sampling with a KV cache: prefill once, then decode chunks on device.

Shapes: B samples (rows), P padded prompt bucket, C decode chunk, V vocab,
N new tokens, S = max_seq_length.

The prompt is prefilled in one pass (padded to a power-of-two bucket, its true
length passed explicitly), then a jitted `lax.fori_loop` decodes up to C tokens
per call, reading and writing the fixed-size cache; the host streams each chunk.

Context overflow: the model only knows S positions. Prompts are cut to their
last S - 1 characters. When the cache is full and another token is needed, the
last S - 1 tokens are prefilled again and decoding goes on (from then on every
new token costs one such re-prefill, like full recompute).
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from chatgot_jax import prng
from chatgot_jax.cpu_tuning import sampling_compiler_options
from chatgot_jax.config import ModelConfig
from chatgot_jax.errors import InvalidArgument, UserError
from chatgot_jax.model import Decoder, init_cache, unstack_layers

CHUNK = 32  # decode steps per device call (and per streamed piece)
MIN_BUCKET = 16  # smallest prefill length
TOP_P_TOLERANCE = 1e-6  # cumulative probability within this of p counts as reaching p

# Times each jitted function's Python body was traced (tests count compilations).
trace_counts = collections.Counter()


def filter_logits(logits_BxV, top_k, top_p):
    """-inf outside the top-k (0 = off), then outside the top-p nucleus (1.0 = off).

    The nucleus is the smallest set of tokens, by descending probability after
    top-k, whose cumulative probability reaches top_p; it keeps at least the top
    token. Both sets are a prefix of the sorted logits, so the result keeps every
    logit >= the last kept one (exact ties at the cut are all kept). top_k and
    top_p may be traced scalars.
    """
    V = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    rank_V = jnp.arange(V)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    in_top_k_V = (top_k <= 0) | (rank_V < top_k)
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, -jnp.inf), axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of higher-ranked tokens
    in_nucleus_BxV = (before_BxV < top_p - TOP_P_TOLERANCE) | (top_p >= 1.0)
    n_keep_B = jnp.maximum(jnp.sum(in_top_k_V & in_nucleus_BxV, axis=-1), 1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def sample_logits(logits_BxV, keys_B, gen_index, temperature, top_k, top_p):
    """Next token per row: argmax if temperature == 0, else a filtered draw.

    Row b's draw for the gen_index-th new token uses fold_in(keys_B[b], gen_index),
    so results do not depend on how decoding is chunked.
    """
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    scaled_BxV = logits_BxV / safe_t
    filtered_BxV = jax.lax.cond((top_k > 0) | (top_p < 1.0),  # skips the sort when both are off
                                lambda x: filter_logits(x, top_k, top_p), lambda x: x, scaled_BxV)
    step_keys_B = jax.vmap(prng.fold_in, in_axes=(0, None))(keys_B, gen_index)
    drawn_B = jax.vmap(prng.categorical)(step_keys_B, filtered_BxV)
    return jnp.where(temperature > 0, drawn_B, greedy_B).astype(jnp.int32)


_unstack = jax.jit(unstack_layers)


@functools.lru_cache(maxsize=16)
def _compiled(model_cfg: ModelConfig, chunk: int):
    """(prefill, decode) jitted for one model config; jit caches each (B, P) shape.

    Both take params from unstack_layers (the model's unstacked layout).
    """
    model = Decoder(model_cfg, unstacked=True)

    def prefill(params, tokens_RxP, length, gen_index, keys_B, temperature, top_k, top_p):
        """R = B rows, or R = 1 row shared by all B samples (computed once, then tiled)."""
        trace_counts["prefill"] += 1
        R, B = tokens_RxP.shape[0], keys_B.shape[0]
        cache = init_cache(model_cfg, R)
        logits_RxPxV, cache = model.apply({"params": params}, tokens_RxP, cache=cache, index=0)
        logits_RxV = jax.lax.dynamic_index_in_dim(logits_RxPxV, length - 1, axis=1,
                                                  keepdims=False)
        if R != B:  # each layer's k/v (R*H, S, K) -> (B*H, S, K), row-major in (b, h)
            cache = jax.tree.map(lambda x: jnp.tile(x, (B, 1, 1)), cache)
        logits_BxV = jnp.broadcast_to(logits_RxV, (B, logits_RxV.shape[-1]))
        tok_B = sample_logits(logits_BxV, keys_B, gen_index, temperature, top_k, top_p)
        return cache, tok_B, logits_BxV

    def decode(params, cache, tok_B, pos, gen_index, n_steps, keys_B, temperature, top_k,
               top_p):
        """Feeds tok_B at pos, samples, repeats n_steps (<= chunk) times."""
        trace_counts["decode"] += 1
        B, V = tok_B.shape[0], model_cfg.vocab_size

        def step(i, carry):
            cache, tok_B, out_BxC, logits_CxBxV = carry
            logits_Bx1xV, cache = model.apply({"params": params}, tok_B[:, None],
                                              cache=cache, index=pos + i)
            logits_BxV = logits_Bx1xV[:, 0]
            tok_B = sample_logits(logits_BxV, keys_B, gen_index + i, temperature, top_k, top_p)
            out_BxC = jax.lax.dynamic_update_index_in_dim(out_BxC, tok_B, i, axis=1)
            logits_CxBxV = jax.lax.dynamic_update_index_in_dim(logits_CxBxV, logits_BxV, i, 0)
            return cache, tok_B, out_BxC, logits_CxBxV

        init = (cache, tok_B, jnp.zeros((B, chunk), jnp.int32),
                jnp.zeros((chunk, B, V), jnp.float32))
        return jax.lax.fori_loop(0, n_steps, step, init)

    opts = sampling_compiler_options()
    return (jax.jit(prefill, compiler_options=opts),
            jax.jit(decode, donate_argnums=1, compiler_options=opts))


def prefill_bucket(length: int, max_seq_length: int) -> int:
    """Padded prefill length: the next power of two >= length (>= MIN_BUCKET), capped at S."""
    return min(max_seq_length, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples) -> None:
    """InvalidArgument naming the first bad value's parameter."""
    if max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens", f"must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:  # also catches NaN
        raise InvalidArgument("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise InvalidArgument("top_p", f"must be in (0, 1] (1 = off), got {top_p}")
    if num_samples < 1:
        raise InvalidArgument("num_samples", f"must be at least 1, got {num_samples}")


def check_prompt(tokenizer, prompt: str) -> None:
    """UserError if the prompt is empty or has characters outside the vocabulary."""
    if not isinstance(prompt, str) or not prompt:
        raise UserError("the prompt is empty: the model has no start token, "
                        "give at least one character")
    unknown = tokenizer.unknown_chars(prompt)
    if unknown:
        raise UserError("prompt has characters not in the model's vocabulary: "
                        + ", ".join(repr(c) for c in unknown))


def generate_ids(params, model_cfg: ModelConfig, prompt_ids, *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 num_samples: int = 1, seed: int = 0, on_ids=None, return_logits=False):
    """Token-level generate: -> ids_BxN (np.int32), plus logits_NxBxV if return_logits.

    on_ids(ids_Bxn) is called with each newly produced piece (n >= 1).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples)
    S, B, N = model_cfg.max_seq_length, num_samples, max_new_tokens
    if S < 2:
        raise UserError(f"model.max_seq_length must be at least 2 to sample, got {S}")
    prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)[-(S - 1):]
    if prompt_ids.size == 0:
        raise UserError("the prompt is empty: give at least one character")
    if model_cfg.matmul_dtype == "auto":
        # One row per sample each decoded token: float32 products decode faster than
        # bfloat16 ones even on AMX (docs/performance.md), so auto means float32 here.
        model_cfg = dataclasses.replace(model_cfg, matmul_dtype="float32")
    prefill, decode = _compiled(model_cfg, CHUNK)
    params = _unstack(params)  # one copy per call; each decoded token then reads it in place
    keys_B = jax.random.split(jax.random.key(seed), B)
    knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
    context_1xL = prompt_ids[None]
    pieces, logit_pieces = [], []

    def emit(ids_Bxn, logits_nxBxV):
        ids_Bxn = np.asarray(ids_Bxn)
        pieces.append(ids_Bxn)
        if return_logits:
            logit_pieces.append(np.asarray(logits_nxBxV))
        if on_ids is not None:
            on_ids(ids_Bxn)

    def run_prefill(ctx_RxL, gen_index):
        R, L = ctx_RxL.shape
        tokens_RxP = np.zeros((R, prefill_bucket(L, S)), np.int32)
        tokens_RxP[:, :L] = ctx_RxL
        cache, tok_B, logits_BxV = prefill(params, tokens_RxP, np.int32(L),
                                           np.int32(gen_index), keys_B, *knobs)
        emit(tok_B[:, None], logits_BxV[None])
        return cache, tok_B, L

    cache, tok_B, pos = run_prefill(context_1xL, 0)  # one row, shared by the B samples
    done = 1
    while done < N:
        if pos == S:  # cache full: slide the window to the last S - 1 tokens
            context_BxL = np.broadcast_to(context_1xL, (B, context_1xL.shape[1]))
            window_BxL = np.concatenate([context_BxL] + pieces, axis=1)[:, -(S - 1):]
            cache, tok_B, pos = run_prefill(window_BxL, done)
            done += 1
            continue
        n = min(CHUNK, N - done, S - pos)
        cache, tok_B, out_BxC, logits_CxBxV = decode(
            params, cache, tok_B, np.int32(pos), np.int32(done), np.int32(n), keys_B, *knobs)
        emit(out_BxC[:, :n], logits_CxBxV[:n])
        pos += n
        done += n
    ids_BxN = np.concatenate(pieces, axis=1).astype(np.int32)
    if return_logits:
        return ids_BxN, np.concatenate(logit_pieces, axis=0)
    return ids_BxN


def generate(params, model_cfg: ModelConfig, tokenizer, prompt: str, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_samples: int = 1, seed: int = 0, on_text=None) -> list[str]:
    """Samples num_samples continuations of prompt (prompt not included), as one batch.

    temperature 0 is greedy; top_k 0 and top_p 1.0 are off. on_text(i, piece)
    streams sample i's text a chunk at a time. Prompts longer than
    max_seq_length - 1 keep their last max_seq_length - 1 characters; past the
    context, the window slides (see the module docstring).
    """
    check_prompt(tokenizer, prompt)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model has "
                        f"vocab_size {model_cfg.vocab_size}; use the checkpoint's tokenizer")
    on_ids = None
    if on_text is not None:
        def on_ids(ids_Bxn):
            for i, row in enumerate(ids_Bxn):
                on_text(i, tokenizer.decode(row))
    ids_BxN = generate_ids(params, model_cfg, tokenizer.encode(prompt),
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, num_samples=num_samples, seed=seed,
                           on_ids=on_ids)
    return [tokenizer.decode(row) for row in ids_BxN]


@functools.lru_cache(maxsize=16)
def _full_apply(model_cfg: ModelConfig):
    return jax.jit(lambda params, tokens_BxS: Decoder(model_cfg).apply({"params": params},
                                                                        tokens_BxS),
                   compiler_options=sampling_compiler_options())


def generate_recompute(params, model_cfg: ModelConfig, prompt_ids, *, max_new_tokens: int):
    """Reference greedy decoding by full recompute (no cache), batch 1.

    Each step applies the model to the whole context, padded to max_seq_length
    (exact: attention is causal) so one compilation serves every length, and
    reads the logits at the last real position. Same window rule as the cached
    path: prompt cut to S - 1; when the context would exceed S, it restarts from
    the last S - 1 tokens. -> (ids_N, logits_NxV) as numpy.
    """
    S = model_cfg.max_seq_length
    apply = _full_apply(model_cfg)
    seq = [int(t) for t in np.asarray(prompt_ids).reshape(-1)[-(S - 1):]]
    start, new_ids, new_logits = 0, [], []
    for _ in range(max_new_tokens):
        if len(seq) - start > S:
            start = len(seq) - (S - 1)
        ctx = seq[start:]
        tokens_1xS = np.zeros((1, S), np.int32)
        tokens_1xS[0, :len(ctx)] = ctx
        logits_V = np.asarray(apply(params, tokens_1xS)[0, len(ctx) - 1])
        tok = int(np.argmax(logits_V))
        seq.append(tok)
        new_ids.append(tok)
        new_logits.append(logits_V)
    return np.asarray(new_ids, np.int32), np.stack(new_logits)
