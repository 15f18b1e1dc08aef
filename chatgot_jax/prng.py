"""jax.random's threefry draws, bit for bit, several times faster on CPU.

Used for dropout's random words (random_bits) and for sampling's per-token
keys and draws (fold_in, categorical).

JAX lowers its threefry2x32 hash on CPU as a loop over groups of rounds, which
XLA cannot fuse; written out with its 20 rounds unrolled, the whole hash
becomes one vectorised elementwise pass (docs/performance.md has the figures).
The counters follow JAX's partitionable threefry (the default): word i is the
xor of the two outputs of threefry2x32(key, (0, i)), so the result is
elementwise in i and shards like any other array.
"""

import jax
import jax.numpy as jnp

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, r: int):
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher (20 rounds, Random123) on uint32 arrays."""
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x = [x1 + ks[0], x2 + ks[1]]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x[0] = x[0] + x[1]
            x[1] = x[0] ^ _rotl(x[1], r)
        x[0] = x[0] + ks[(i + 1) % 3]
        x[1] = x[1] + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x[0], x[1]


def random_bits(rng, n: int):
    """(n,) uint32, equal to jax.random.bits(rng, (n,), jnp.uint32).

    Falls back to jax.random.bits for other key implementations and for n >= 2^32
    (where JAX's counters use their high word).
    """
    key_data = jax.random.key_data(rng)
    if key_data.shape != (2,) or n >= 2 ** 32:
        return jax.random.bits(rng, (n,), jnp.uint32)
    counters = jnp.arange(n, dtype=jnp.uint32)
    a, b = threefry2x32(key_data[0], key_data[1], jnp.zeros_like(counters), counters)
    return a ^ b


def fold_in(rng, data):
    """Equal to jax.random.fold_in(rng, data) for a scalar uint32/int32 data.

    JAX's threefry fold_in hashes the counter pair (0, data) under the key and
    the two output words are the new key. Falls back to JAX for other keys.
    """
    key_data = jax.random.key_data(rng)
    if key_data.shape != (2,):
        return jax.random.fold_in(rng, data)
    a, b = threefry2x32(key_data[0], key_data[1], jnp.uint32(0), jnp.asarray(data, jnp.uint32))
    return jax.random.wrap_key_data(jnp.stack([a, b]), impl=jax.random.key_impl(rng))


def categorical(rng, logits_V):
    """Equal to jax.random.categorical(rng, logits_V) (Gumbel-max).

    Same words (random_bits), same uniform in [tiny, 1) and same Gumbel noise
    -log(-log(u)) as JAX's default ("low") mode, so the same index. Other than
    1-D float32 logits, or with high-dynamic-range Gumbel on, it calls JAX.
    """
    if (logits_V.ndim != 1 or logits_V.dtype != jnp.float32
            or jax.config.jax_high_dynamic_range_gumbel):
        return jax.random.categorical(rng, logits_V)
    tiny = jnp.finfo(jnp.float32).tiny
    bits = random_bits(rng, logits_V.shape[0])
    floats = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000),
                                          jnp.float32) - 1.0
    u = jnp.maximum(tiny, floats * (1.0 - tiny) + tiny)
    return jnp.argmax(-jnp.log(-jnp.log(u)) + logits_V)
