"""Every character of a text scored once, each with a fixed amount of history.

    window_plan(n_tokens, seq_len)          the sliding windows and what each predicts
    char_nll(params, model_cfg, tokens)     float64 (n_tokens - 1,): -log p of each character
                                            after the first, in nats

The windows hold seq_len inputs. The first predicts every position it holds
(characters 1 .. seq_len, with 1 .. seq_len characters of history); each later
window starts stride = seq_len // 2 characters after the previous one's end
minus its length, and predicts only its last positions, the characters the
windows before it left: every one of them has at least seq_len - stride + 1
characters of history. The last window is moved back to end at the text's
end. A text no longer than a window is one window, padded and masked.
"""

import functools

import numpy as np


def window_plan(n_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, first) of the windows over tokens[0:n_tokens]: window i reads inputs
    tokens[starts[i] : starts[i] + seq_len] and predicts the targets of input offsets
    first[i] .. seq_len - 1 (offset j predicts token starts[i] + j + 1). Every target
    1 .. n_tokens - 1 is predicted exactly once, in order."""
    if n_tokens < 2:
        raise ValueError(f"a text of {n_tokens} characters has nothing to predict")
    n_targets, stride = n_tokens - 1, max(1, seq_len // 2)
    starts, first, covered = [0], [0], min(seq_len, n_targets)  # targets 1 .. covered
    while covered < n_targets:
        start = min(covered + stride - seq_len, n_targets - seq_len)
        starts.append(start)
        first.append(covered - start)
        covered = start + seq_len
    return np.asarray(starts), np.asarray(first)


def windows(tokens: np.ndarray, seq_len: int):
    """(x, y, mask), each (W, seq_len): the plan's inputs, targets, and which targets
    count (the predicted ones, within the text)."""
    tokens = np.asarray(tokens, np.int32)
    starts, first = window_plan(len(tokens), seq_len)
    padded = np.concatenate([tokens, np.zeros(seq_len + 1, np.int32)])
    index = starts[:, None] + np.arange(seq_len + 1)
    offsets = np.arange(seq_len)[None, :]
    mask = (offsets >= first[:, None]) & (starts[:, None] + offsets + 1 < len(tokens))
    return padded[index[:, :-1]], padded[index[:, 1:]], mask


@functools.cache
def _nll_fn(model_cfg):
    import jax  # noqa: PLC0415 (importing this module stays cheap)
    import jax.numpy as jnp  # noqa: PLC0415

    from chatgot_jax.model import Decoder  # noqa: PLC0415

    @jax.jit
    def nll(params, x_BxT, y_BxT):
        logits_BxTxV = Decoder(model_cfg).apply({"params": params}, x_BxT, deterministic=True)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp_BxTxV, y_BxT[..., None], axis=-1)[..., 0]

    return nll


def char_nll(params, model_cfg, tokens, batch_size: int = 32,
             context: int | None = None) -> np.ndarray:
    """-log p(token i | the history window_plan gives it) for i = 1 .. len(tokens) - 1,
    float64, in nats, with windows of context characters (default max_seq_length);
    batch_size windows per jitted forward pass (the last batch padded)."""
    x, y, mask = windows(tokens, context or model_cfg.max_seq_length)
    pad = -len(x) % batch_size
    x, y = (np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in (x, y))
    nll = _nll_fn(model_cfg)
    out = np.concatenate([np.asarray(nll(params, x[i:i + batch_size], y[i:i + batch_size]))
                          for i in range(0, len(x), batch_size)])
    return out[:len(mask)][mask].astype(np.float64)
