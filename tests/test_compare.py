"""Comparisons that say what is real: Student-t statistics against scipy, the full-split
evaluation against a slow float64 loop, the sweep's report over seeds, the compare command."""

import json
import math

import jax
import numpy as np
import pytest
from scipy import stats as sps

from chatgot_jax import checkpoint as ckpt
from chatgot_jax import compare, comparison, evaluate, evaluation, stats, sweep, train_cli
from chatgot_jax import config as config_lib
from chatgot_jax.model import Decoder
from conftest import MICRO_OVERRIDES

ARGS = [*MICRO_OVERRIDES, "--max-steps", "3", "--eval-every", "3", "--batch-size", "8",
        "mesh.data=1", "train.eval_windows=8", "train.sample_tokens=0",
        "train.warmup_steps=1"]


def one_line_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 60])
def test_t_distribution_matches_scipy(df):
    for t in (0.0, 0.3, 1.0, 2.2, 4.0, 12.0):
        assert stats.t_two_sided_p(t, df) == pytest.approx(2 * sps.t.sf(t, df), abs=1e-12)
    for q in (0.6, 0.8, 0.975, 0.995):
        assert stats.t_quantile(q, df) == pytest.approx(sps.t.ppf(q, df), rel=1e-9)


def test_intervals_and_tests_match_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        a = 1.7 + 0.01 * rng.standard_normal(n)
        b = a + 0.004 + 0.003 * rng.standard_normal(n)
        mean = stats.mean_interval(a)
        lo, hi = sps.t.interval(0.95, n - 1, loc=a.mean(), scale=sps.sem(a))
        assert (mean["lo"], mean["hi"]) == (pytest.approx(lo), pytest.approx(hi))
        paired = stats.paired_difference(a, b)
        ref = sps.ttest_rel(a, b)
        assert paired["p"] == pytest.approx(ref.pvalue, rel=1e-9)
        lo, hi = ref.confidence_interval(0.95)
        assert (paired["lo"], paired["hi"]) == (pytest.approx(lo), pytest.approx(hi))
        welch = stats.welch_difference(a, b[::-1][: max(2, n - 1)])
        ref = sps.ttest_ind(a, b[::-1][: max(2, n - 1)], equal_var=False)
        assert welch["p"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert welch["df"] == pytest.approx(ref.df)
    one = stats.mean_interval([1.5])
    assert one["lo"] is None and one["mean"] == 1.5


def test_verdicts_and_seeds_needed():
    base = [1.70, 1.72, 1.71, 1.73, 1.69]
    assert stats.verdict(stats.paired_difference([v - 0.01 for v in base], base)) == "better"
    assert stats.verdict(stats.paired_difference([v + 0.01 for v in base], base)) == "worse"
    noisy = [v + d for v, d in zip(base, (0.01, -0.012, 0.004, -0.006, 0.003))]
    assert stats.verdict(stats.paired_difference(noisy, base)) == \
        "not distinguishable at these seeds"
    assert stats.verdict(stats.paired_difference([1.6], [1.7])) == \
        "not distinguishable at these seeds"  # one pair: no test
    n = stats.seeds_needed(sd=0.005, delta=0.005)
    # the power of a paired t-test with n seeds, from the noncentral t: at least 80%, and
    # less with one seed fewer
    def power(k):
        crit = sps.t.ppf(0.975, k - 1)
        nc = 0.005 / (0.005 / math.sqrt(k))
        return sps.nct.sf(crit, k - 1, nc) + sps.nct.cdf(-crit, k - 1, nc)
    assert power(n) >= 0.8 - 0.02 and power(n - 1) < 0.8 + 0.02
    assert stats.seeds_needed(0.005, 0.0025) > n > stats.seeds_needed(0.005, 0.01)


# ------------------------------------------------------------- full-split evaluation


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Four separate train.py invocations: lr 1e-2 and 3e-2, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("compare")
    for lr in ("1e-2", "3e-2"):
        for seed in (0, 1):
            train_cli.main(["--data", str(corpus), "--out", str(root / f"lr{lr}-s{seed}"),
                            "--lr", lr, "--seed", str(seed), *ARGS])
    return root


def slow_full_split(run_dir) -> tuple[list[float], int]:
    """Every window of the validation split, one at a time, float64 numpy softmax."""
    params, cfg, tokenizer, _ = ckpt.load_for_inference(str(run_dir))
    meta_text = evaluate.corpus_of(json.loads((run_dir / "provenance.jsonl").read_text()
                                              .splitlines()[-1])["data"], None, run_dir)[0]
    tokens = evaluate.split_text(meta_text, tokenizer, cfg.train.val_fraction, "val")
    T = cfg.model.max_seq_length
    starts, first = evaluation.window_plan(len(tokens), T)
    forward = jax.jit(lambda x: Decoder(cfg.model).apply({"params": params}, x,
                                                         deterministic=True))
    nll = []
    for s, f in zip(starts, first):  # one window at a time, the softmax in numpy float64
        x = np.asarray(tokens[s:s + T])[None]
        logits = np.asarray(forward(x), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll += [-logp[j, tokens[s + j + 1]] for j in range(f, x.shape[1])
                if s + j + 1 < len(tokens)]
    return nll, len(tokens)


def test_full_split_evaluation_matches_a_slow_loop(runs, capsys):
    run_dir = runs / "lr1e-2-s0"
    nll, n_split = slow_full_split(run_dir)
    assert len(nll) == n_split - 1  # every character after the first, once
    got = evaluate.main([str(run_dir), "--json", str(run_dir / "e.json")])
    assert got["chars"] == n_split - 1 and got["step"] == 3 and got["split"] == "val"
    assert got["nats_per_char"] == pytest.approx(np.mean(nll), abs=1e-5)
    assert got["bits_per_char"] == pytest.approx(np.mean(nll) / math.log(2), abs=1e-5)
    assert 0 < got["se_nats"] < 0.1 and got["blocks"] >= 2
    assert json.loads((run_dir / "e.json").read_text()) == got
    printed = capsys.readouterr().out
    assert f"{got['nats_per_char']:.4f} ± {got['se_nats']:.4f} nats/char" in printed
    # remembered in the run directory: the same call reads it back
    assert evaluate.evaluate_run(run_dir) == got
    assert len((run_dir / evaluate.EVALUATIONS).read_text().splitlines()) == 1
    shorter = evaluate.evaluate_run(run_dir, context=8, cache=False)
    assert shorter["chars"] == got["chars"] and shorter["context"] == 8


def test_block_standard_error_is_the_spread_of_block_means():
    nll = np.repeat([1.0, 3.0], 500)  # two halves: block means 1 and 3
    se, blocks = evaluate.block_standard_error(nll, context=500)
    assert blocks == 2 and se == pytest.approx(np.std([1.0, 3.0], ddof=1) / math.sqrt(2))
    flat, _ = evaluate.block_standard_error(np.full(4000, 2.0), context=8)
    assert flat == 0.0


def test_evaluate_bad_inputs_are_one_line(runs, tmp_path, capsys):
    run_dir = runs / "lr1e-2-s1"
    assert "does not exist" in one_line_error(evaluate.main, [str(tmp_path / "no")], capsys)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert "holds no complete checkpoint" in one_line_error(
        evaluate.main, [str(tmp_path / "empty")], capsys)
    assert "--context must be between 2 and the model's max_seq_length 32" in one_line_error(
        evaluate.main, [str(run_dir), "--context", "33"], capsys)
    assert "no checkpoint at step 7" in one_line_error(
        evaluate.main, [str(run_dir), "--step", "7"], capsys)


# ------------------------------------------------------------------------ the reports


def test_compare_separate_train_invocations(runs, tmp_path, capsys):
    rep = compare.main([str(runs / n) for n in ("lr1e-2-s0", "lr1e-2-s1", "lr3e-2-s0",
                                                 "lr3e-2-s1")] + ["--out",
                                                                  str(tmp_path / "c.png")])
    [best, other] = rep["configs"]
    assert {best["config"], other["config"]} == {"train.lr=0.01", "train.lr=0.03"}
    assert best["n"] == other["n"] == 2 and best["lo"] < best["mean"] < best["hi"]
    assert best["mean"] <= other["mean"] and best["verdict"] == "best"
    assert other["paired"]["n"] == 2 and other["welch"] is None  # every seed shared
    finals = {n: json.loads(line)["val_loss"] for n in ("lr1e-2-s0", "lr1e-2-s1", "lr3e-2-s0",
                                                        "lr3e-2-s1")
              for line in (runs / n / "metrics.jsonl").read_text().splitlines()
              if "val_loss" in json.loads(line)}
    by_seed = {s: finals[f"lr3e-2-s{s}"] - finals[f"lr1e-2-s{s}"] for s in (0, 1)}
    sign = 1 if other["config"] == "train.lr=0.03" else -1
    assert other["paired"]["diff"] == pytest.approx(sign * np.mean(list(by_seed.values())))
    printed = capsys.readouterr().out
    assert "| vs best, paired: diff [95% CI] | p |" in printed and "verdict" in printed
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_in_one_line(runs, tmp_path, capsys):
    a, b = str(runs / "lr1e-2-s0"), str(runs / "lr1e-2-s1")
    assert "form one group" in one_line_error(compare.main, [a, b], capsys)
    assert "is not a directory" in one_line_error(compare.main, [a, str(tmp_path / "x")],
                                                  capsys)
    (tmp_path / "plain").mkdir()
    assert "neither a run directory" in one_line_error(compare.main, [a, str(tmp_path / "plain")],
                                                       capsys)
    assert "--by train.lrr: no run has that config field" in one_line_error(
        compare.main, [a, b, "--by", "train.lrr"], capsys)
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(runs / "lr3e-2-s0", bare)
    lines = (bare / "metrics.jsonl").read_text().splitlines()
    (bare / "metrics.jsonl").write_text("\n".join(x for x in lines if "val_loss" not in x))
    assert "has no validation loss in its metrics.jsonl" in one_line_error(
        compare.main, [a, str(bare)], capsys)
    shutil.rmtree(bare / "checkpoints")
    assert "holds no checkpoint to evaluate" in one_line_error(
        compare.main, [a, str(bare), "--metric", "full"], capsys)


def test_sweep_report_over_seeds(corpus, tmp_path, capsys):
    """2 configs x 3 seeds, one vmapped program; the report, from the full-split
    evaluation of each run's final checkpoint (--final-eval full)."""
    out = tmp_path / "sweep"
    summary = sweep.main(["--data", str(corpus), "--out", str(out), "--grid",
                          "train.lr=1e-2,3e-2", "--seeds", "0", "1", "2", "--final-eval",
                          "full", *ARGS])
    assert summary["metric"] == "full" and len(summary["runs"]) == 6
    assert json.loads((out / "summary.json").read_text()) == summary
    [best, other] = summary["configs"]
    assert best["n"] == other["n"] == 3 and best["mean"] <= other["mean"]
    for row in (best, other):
        runs = [r for r in summary["runs"] if " ".join(r["overrides"]) == row["config"]]
        values = [r["full_val_loss"] for r in runs]
        assert row["values"] == values and row["mean"] == pytest.approx(np.mean(values))
        assert all(r["full_val_loss"] != r["final_val_loss"] for r in runs)  # another metric
    assert other["paired"]["n"] == 3 and other["paired"]["p"] is not None
    assert other["verdict"] in ("worse", "not distinguishable at these seeds")
    table = (out / "summary.md").read_text()
    assert "| config | seeds | nats/char: mean [95% CI] |" in table
    assert "full-split validation loss of the final checkpoint" in table
    assert f"| {best['config']} | 3 |" in table and "| best |" in table


def test_runs_that_differ_only_in_what_they_log_are_one_config(tmp_path):
    """Seeds and logging fields do not split a group; a training field or the side does."""
    def run(name, side="jax", **train):
        d = tmp_path / name
        d.mkdir()
        cfg = config_lib.load_config("tiny", overrides=[f"train.{k}={v}"
                                                        for k, v in train.items()])
        (d / "config.json").write_text(json.dumps(config_lib.to_dict(cfg)))
        if side == "pytorch":
            (d / "torch.json").write_text("{}")
        return d

    same = [run("a", seed=0, sample_tokens=0, log_every=5),
            run("b", seed=1, sample_tokens=200, eval_every=7, save_every=9, keep=2)]
    assert list(comparison.group_runs(same).values()) == [same]
    other = run("c", seed=0, lr=0.01)
    torch_run = run("d", "pytorch", seed=0, sample_tokens=0)
    groups = comparison.group_runs([*same, other, torch_run])
    assert sorted(map(len, groups.values())) == [1, 1, 2]
    assert all("sample_tokens" not in label for label in groups)
