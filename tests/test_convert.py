"""PyTorch parity: torch_model <-> chatgot_jax weights (torch_weights), logits, loss, the convert CLI."""

import dataclasses
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from chatgot_jax import convert  # noqa: E402
from chatgot_jax import torch_weights as tw  # noqa: E402
from chatgot_jax.config import ModelConfig  # noqa: E402
from chatgot_jax.data import CharTokenizer  # noqa: E402
from chatgot_jax.model import Decoder, cross_entropy, param_shapes  # noqa: E402
from chatgot_jax.tools import torch_model  # noqa: E402
from conftest import MICRO  # noqa: E402

TINY = dict(vocab_size=40, d_model=256, n_layers=4, n_head=4, d_hid=1024, max_seq_length=64)
# Parity tolerance on logits and loss, both float32. Measured over seeds 0-3:
# the largest logit difference is 4.8e-7..6.0e-7 for the micro shapes and
# 2.4e-6..3.6e-6 for the tiny ones (d_model 256, d_hid 1024), the loss
# difference at most 7.2e-7. The logits reach |4.4| (tiny), where a float32
# ulp is 4.8e-7: the tiny model's difference is ~7 ulps, from PyTorch and XLA
# summing the same 256- and 1024-term dot products in different orders. 1e-5
# (~20 ulps) leaves 2.8x over the largest measured, and the wrong-numerics
# controls below exceed it by 30x and more.
TOL = 1e-5


def make_torch(cfg: ModelConfig, layout: str, seed: int = 0):
    """A torch_model in eval mode whose every tensor is random (no zero biases, no unit scales)."""
    torch.manual_seed(seed)
    model = torch_model.build(cfg, layout).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def jax_forward(cfg: ModelConfig):
    return jax.jit(lambda params, tokens: Decoder(cfg).apply({"params": params}, tokens))


def compare(cfg: ModelConfig, layout: str, batch: int = 2, seed: int = 0,
            jax_cfg: ModelConfig | None = None, embedding_scale: float = 1.0):
    """-> (max |logit diff|, |loss diff|) of the torch model and its conversion.

    jax_cfg: the JAX side's config (default cfg; the negative controls give it
    other numerics). embedding_scale multiplies the torch token and position
    embeddings (before conversion, so both sides get them).
    """
    model = make_torch(cfg, layout, seed)
    if embedding_scale != 1.0:
        with torch.no_grad():
            model.tok_emb.weight.mul_(embedding_scale)
            model.pos_emb.weight.mul_(embedding_scale)
    params = tw.torch_to_params(model.state_dict(), cfg, layout)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, cfg.max_seq_length + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
        ref_loss = torch.nn.functional.cross_entropy(
            ref.reshape(-1, cfg.vocab_size), torch.from_numpy(y).reshape(-1)).item()
    logits = jax_forward(jax_cfg or cfg)(params, jnp.asarray(x, jnp.int32))
    loss = float(cross_entropy(logits, jnp.asarray(y, jnp.int32)))
    return float(np.max(np.abs(np.asarray(logits) - ref.numpy()))), abs(loss - ref_loss)


def config(shape: dict, layout: str, **kw) -> ModelConfig:
    """float32 products: the tolerances are float32's on every CPU."""
    return ModelConfig(**{**shape, "matmul_dtype": "float32"}, memory=layout == "decoder", **kw)


@pytest.mark.parametrize("layout", tw.LAYOUTS)
@pytest.mark.parametrize("shape", [MICRO, TINY], ids=["micro", "tiny"])
def test_logits_and_loss_match_torch(shape, layout):
    logit_diff, loss_diff = compare(config(shape, layout), layout)
    assert logit_diff <= TOL and loss_diff <= TOL, (logit_diff, loss_diff)


def test_numerics_flags_match_torch():
    cfg = config(MICRO, "decoder", gelu_approximate=True, scale_embeddings=True,
                 layer_norm_eps=1e-6)
    logit_diff, loss_diff = compare(cfg, "decoder", seed=1)
    assert logit_diff <= TOL and loss_diff <= TOL, (logit_diff, loss_diff)


# Embeddings scaled by 0.01 for the wrong-numerics controls. nn.Embedding's
# N(0, 1) init makes the first LayerNorm's input (token + position embedding)
# of variance ~2, against which eps 1e-5 or 1e-6 changes the normalised output
# by a factor sqrt((2 + 1e-5) / (2 + 1e-6)) ~ 1 + 2e-6: the wrong eps then moves
# the logits by 7.4e-6 only (measured), under TOL. Scaled by 0.01 the variance
# is ~2e-4 and the factor sqrt((2e-4 + 1e-5) / (2e-4 + 1e-6)) ~ 1.02, a 2%
# change of every first-LayerNorm output.
SMALL_EMBEDDINGS = 0.01


@pytest.mark.parametrize("layout", tw.LAYOUTS)
@pytest.mark.parametrize("wrong", [dict(layer_norm_eps=1e-6), dict(gelu_approximate=True)],
                         ids=["eps-1e-6", "gelu-tanh"])
def test_wrong_numerics_fail_the_tolerance(layout, wrong):
    """Negative controls: the JAX side built with LayerNorm eps 1e-6 (PyTorch's is
    1e-5) or the tanh GELU (PyTorch's nn.GELU() is the exact erf form) misses
    TOL by over 10x on the same weights where the right config meets it.
    (Measured: eps 6.6e-2..8.5e-2, ~7000x TOL; GELU 3.2e-4..3.4e-4, ~30x TOL.)"""
    cfg = config(MICRO, layout)
    right, _ = compare(cfg, layout, embedding_scale=SMALL_EMBEDDINGS)
    assert right <= TOL, right
    logit_diff, _ = compare(cfg, layout, jax_cfg=dataclasses.replace(cfg, **wrong),
                            embedding_scale=SMALL_EMBEDDINGS)
    assert logit_diff > 10 * TOL, logit_diff


@pytest.mark.parametrize("layout", tw.LAYOUTS)
def test_round_trip_is_exact(layout):
    cfg = config(MICRO, layout)
    state_dict = make_torch(cfg, layout).state_dict()
    assert tw.torch_shapes(cfg, layout) == {k: tuple(v.shape) for k, v in
                                                 state_dict.items()}
    params = tw.torch_to_params(state_dict, cfg, layout)
    want = jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(cfg))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want
    back = tw.params_to_torch(jax.tree.map(jnp.asarray, params), cfg, layout)
    assert list(back) == list(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(back[name], tensor), name


def test_infer_shape():
    cfg = config(TINY, "encoder")
    state_dict = torch_model.build(cfg, "encoder").state_dict()
    assert tw.detect_layout(state_dict) == "encoder"
    shape = tw.infer_shape(state_dict, "encoder")
    assert shape == {k: getattr(cfg, k) for k in tw.INFERRED}
    assert tw.config_for(state_dict, "encoder").model.n_head == 4  # d_model // 64


@pytest.fixture
def saved(tmp_path):
    """A micro decoder-layout torch model, its state dict file and a tokenizer file."""
    cfg = config(MICRO, "decoder")
    model = make_torch(cfg, "decoder", seed=2)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    CharTokenizer("".join(chr(ord("A") + i) for i in range(39))).save(tmp_path / "vocab.json")
    return cfg, model, tmp_path


def test_cli_from_torch_and_back(saved, capsys, open_managers):
    from chatgot_jax.checkpoint import load_for_inference

    cfg, model, tmp = saved
    convert.main(["--from-torch", str(tmp / "model.pt"), "--out", str(tmp / "run"),
                  "--tokenizer", str(tmp / "vocab.json"), "model.n_head=4"])
    assert open_managers == {}  # the converter closed the manager it wrote with
    params, loaded_cfg, tokenizer, step = load_for_inference(str(tmp / "run"))
    assert step == 0 and tokenizer.vocab_size == 40
    # dropout and matmul_dtype: the defaults
    assert dataclasses.replace(loaded_cfg.model, dropout=cfg.dropout,
                               matmul_dtype=cfg.matmul_dtype) == cfg
    tokens = np.random.default_rng(0).integers(0, 40, (2, cfg.max_seq_length))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).numpy()
    logits = jax_forward(cfg)(params, jnp.asarray(tokens, jnp.int32))
    assert np.max(np.abs(np.asarray(logits) - ref)) <= TOL

    convert.main(["--to-torch", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "b.pt")])
    back = torch.load(tmp / "b.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert "wrote" in capsys.readouterr().out
    assert open_managers == {}


def test_cli_wrong_shape_names_the_tensor(saved, capsys):
    _, model, tmp = saved
    state_dict = model.state_dict()
    state_dict["decoder.layers.1.linear1.weight"] = torch.zeros(65, 32)
    torch.save(state_dict, tmp / "bad.pt")
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--from-torch", str(tmp / "bad.pt"), "--out", str(tmp / "run"),
                      "--tokenizer", str(tmp / "vocab.json"), "model.n_head=4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: decoder.layers.1.linear1.weight has shape (65, 32), "
                   "expected (64, 32)"]
    assert not (tmp / "run").exists()


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("head.bias"), "missing tensor head.bias"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "unexpected tensor extra.weight"),
])
def test_missing_and_unexpected_tensors(change, message):
    cfg = config(MICRO, "decoder")
    state_dict = torch_model.build(cfg, "decoder").state_dict()
    change(state_dict)
    with pytest.raises(tw.UserError, match=message):
        tw.check_state_dict(state_dict, cfg, "decoder")


def test_layout_mismatch_is_a_user_error():
    cfg = config(MICRO, "encoder")
    state_dict = torch_model.build(cfg, "encoder").state_dict()
    with pytest.raises(tw.UserError, match="state dict of the encoder layout"):
        tw.check_state_dict(state_dict, dataclasses.replace(cfg, memory=True), "decoder")
