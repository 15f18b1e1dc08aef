"""The Python API: chatgot_jax.train, chatgot_jax.load, Model.generate and Model.loss, and the
sliding windows that score every character once."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import chatgot_jax
from chatgot_jax import checkpoint as ckpt
from chatgot_jax import evaluation, sample_cli
from chatgot_jax.errors import InvalidArgument, UserError
from chatgot_jax.model import Decoder
from conftest import MICRO_OVERRIDES

FIELDS = dict(batch_size=8, eval_windows=8, sample_tokens=0, warmup_steps=1, max_steps=3,
              eval_every=3, save_every=3)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A micro run trained through chatgot_jax.train, config fields as keywords."""
    out = tmp_path_factory.mktemp("api") / "run"
    summary = chatgot_jax.train(data=str(corpus), out=str(out),
                                overrides=[*MICRO_OVERRIDES, "mesh.data=1"], lr=1e-2, **FIELDS)
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 8 * 32
    assert summary["checkpoint"] == str(out / "checkpoints") and not summary["interrupted"]
    assert summary["best_val_loss"] > 0 and summary["diverged"] is None
    return out


def test_train_sets_fields_by_name_and_is_resumable(run, corpus):
    model = chatgot_jax.load(run)
    assert model.step == 3 and model.config.train.lr == 1e-2
    assert model.config.train.batch_size == 8 and model.config.model.d_model == 32
    again = chatgot_jax.train(data=str(corpus), out=str(run),
                              overrides=[*MICRO_OVERRIDES, "mesh.data=1"], lr=1e-2, **FIELDS)
    assert again["steps"] == 3 and again["wall_time_s"] == 0.0  # nothing to do


def test_library_errors_are_exceptions_not_exits(run, corpus, tmp_path):
    with pytest.raises(InvalidArgument, match="is not a config field name"):
        chatgot_jax.train(out=str(tmp_path / "x"), learning_rate=1e-3)
    with pytest.raises(UserError, match="unknown config key"):
        chatgot_jax.train(out=str(tmp_path / "x"), overrides=["train.lrr=1"])
    with pytest.raises(UserError, match="holds a run trained with other settings"):
        chatgot_jax.train(data=str(corpus), out=str(run),
                          overrides=[*MICRO_OVERRIDES, "mesh.data=1"], lr=3e-2, **FIELDS)
    with pytest.raises(UserError, match="does not exist"):
        chatgot_jax.load(tmp_path / "nowhere")
    with pytest.raises(InvalidArgument, match="step must be None, an int or 'best'"):
        chatgot_jax.load(run, step="newest")
    with pytest.raises(UserError, match="no checkpoint at step 7"):
        chatgot_jax.load(run, step=7)
    model = chatgot_jax.load(run)
    with pytest.raises(InvalidArgument, match="temperature"):
        model.generate("ARYA: ", temperature=-1.0)
    with pytest.raises(UserError):
        model.generate("")
    with pytest.raises(InvalidArgument, match="text needs at least 2 characters"):
        model.loss("A")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs, flags", [
    (dict(temperature=0.0), ["--temperature", "0"]),
    (dict(temperature=0.9, top_k=5, seed=3, num_samples=2),
     ["--temperature", "0.9", "--top-k", "5", "--seed", "3", "--num-samples", "2"]),
])
def test_generate_gives_what_the_sample_command_prints(run, capsys, kwargs, flags):
    texts = chatgot_jax.load(run).generate("ARYA: ", max_new_tokens=40, **kwargs)
    assert len(texts) == kwargs.get("num_samples", 1) and all(len(t) == 40 for t in texts)
    sample_cli.main(["--checkpoint", str(run), "--prompt", "ARYA: ", "--max-new-tokens", "40",
                     *flags])
    printed = capsys.readouterr().out
    if len(texts) == 1:
        assert printed == f"ARYA: {texts[0]}\n"
    else:
        assert printed == "".join(f"--- sample {i}/2 ---\nARYA: {t}\n"
                                  for i, t in enumerate(texts, 1))


def test_load_best_and_by_step(run):
    best = ckpt.load_for_inference(str(run), best=True)[3]
    assert chatgot_jax.load(run, step="best").step == best == 3
    assert chatgot_jax.load(run / "checkpoints" / "3").step == 3
    assert "step=3" in repr(chatgot_jax.load(run, step=3))


@pytest.mark.parametrize("n_tokens, seq_len", [(2, 8), (9, 8), (10, 8), (33, 8), (100, 7),
                                               (257, 64), (1000, 1), (1000, 2)])
def test_window_plan_scores_every_character_once_with_enough_history(n_tokens, seq_len):
    starts, first = evaluation.window_plan(n_tokens, seq_len)
    predicted, history = [], []
    for k, (s, f) in enumerate(zip(starts, first)):
        assert 0 <= s and (s + seq_len <= n_tokens - 1 or len(starts) == 1)
        for j in range(f, seq_len):
            if s + j + 1 < n_tokens:
                predicted.append(s + j + 1)
                history.append((k, j + 1))
    assert predicted == list(range(1, n_tokens))  # each once, in order
    # the first window sees what it can; every later prediction has half a context or more
    assert all(h >= seq_len - max(1, seq_len // 2) + 1 for k, h in history if k > 0)


def test_loss_is_the_mean_nll_over_the_windows_computed_slowly(run):
    """Model.loss against a float64 numpy log-softmax of each window's logits, one window
    at a time, over the same windows: equal within 1e-5."""
    model = chatgot_jax.load(run)
    text = "ARYA: winter is coming. JON SNOW: the north remembers, a lannister pays. " * 3
    tokens = model.tokenizer.encode(text)
    cfg = model.config.model
    starts, first = evaluation.window_plan(len(tokens), cfg.max_seq_length)
    assert len(starts) > 3  # the text is several windows long
    nll = []
    for s, f in zip(starts, first):
        x = np.asarray(tokens[s:s + cfg.max_seq_length])[None]
        logits = np.asarray(Decoder(cfg).apply({"params": jax.device_get(model.params)}, x,
                                               deterministic=True), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        for j in range(f, len(x[0])):
            if s + j + 1 < len(tokens):
                nll.append(-logp[j, tokens[s + j + 1]])
    assert len(nll) == len(text) - 1
    assert model.loss(text) == pytest.approx(np.mean(nll), abs=1e-5)
    assert model.loss(text) == pytest.approx(float(evaluation.char_nll(
        model.params, cfg, tokens, batch_size=2).mean()), abs=1e-6)  # batching changes nothing


def test_importing_the_package_does_not_import_jax():
    done = subprocess.run([sys.executable, "-c", "import sys, chatgot_jax; "
                           "print(sorted(m for m in ('jax', 'orbax', 'flax') if m in sys.modules),"
                           " callable(chatgot_jax.load), callable(chatgot_jax.train))"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["[]", "True", "True"], done.stderr
