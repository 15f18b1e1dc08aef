"""Benchmarks and figures: the FLOPs formula, --grid parsing, the plots, the bench CLI."""

import argparse
import json

import pytest

from chatgot_jax import config as config_lib
from chatgot_jax.errors import UserError
from chatgot_jax import plot
from chatgot_jax.tools import bench, report

MICRO = ["model.d_model=32", "model.n_layers=1", "model.n_head=4", "model.d_hid=64",
         "model.max_seq_length=16", "model.vocab_size=40", "train.batch_size=4", "mesh.data=1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_flops_per_token_matches_a_hand_count():
    d, L, d_hid, V, T = 48, 3, 80, 37, 20
    cfg = config_lib.ModelConfig(vocab_size=V, d_model=d, n_layers=L, n_head=4, d_hid=d_hid,
                                 max_seq_length=64)
    attention = 4 * d * d + 4 * d  # q, k, v and out projections with biases
    mlp = 2 * d * d_hid + d_hid + d
    block_norms = 2 * 2 * d  # two LayerNorms, scale and offset
    n = L * (attention + mlp + block_norms) + 2 * d + d * V + V  # + final LN and head
    assert bench.flops_per_token(cfg, T) == 6 * n + 12 * L * d * T


def test_parse_grid_is_the_cartesian_product_in_order():
    points = config_lib.parse_grid("model.remat=none,full  model.compute_dtype=float32,bfloat16")
    assert points == [["model.remat=none", "model.compute_dtype=float32"],
                      ["model.remat=none", "model.compute_dtype=bfloat16"],
                      ["model.remat=full", "model.compute_dtype=float32"],
                      ["model.remat=full", "model.compute_dtype=bfloat16"]]
    assert config_lib.parse_grid("train.batch_size=8") == [["train.batch_size=8"]]


@pytest.mark.parametrize("spec, bad", [
    ("model.remat", "model.remat"), ("remat=none,full", "remat=none,full"),
    ("model.=x", "model.=x"), (".remat=x", ".remat=x"),
    ("model.remat=none model.dropout=0.1,,0.2", "model.dropout=0.1,,0.2"),
    ("model.remat=", "model.remat="), ("model.remat=full,full", "model.remat=full,full"),
    ("model.remat=none model.remat=full", "model.remat=full"), ("  ", "empty")])
def test_parse_grid_rejects_bad_specs(spec, bad):
    with pytest.raises(UserError, match=bad.replace(".", r"\.")):
        config_lib.parse_grid(spec)


def test_grid_refuses_a_bad_key_before_running_anything(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--grid", "model.remat=none,sometimes"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.remat" in err[0]


def test_grid_children_get_every_flag_and_the_point_last():
    args = argparse.Namespace(variant="tiny", mode="train", steps=3, warmup=1, num_samples=1,
                              prompt_len=1, rounds=2, new_tokens=None, torch=True,
                              compile_only=False, overrides=["train.batch_size=8"])
    argv = bench.child_argv(args, ["model.remat=full"], "/tmp/r.json")
    assert argv[1:3] == ["-m", "chatgot_jax.tools.bench"]
    assert argv[-2:] == ["train.batch_size=8", "model.remat=full"]
    for flag in ("--torch", "--json", "--rounds", "--steps"):
        assert flag in argv
    assert "--new-tokens" not in argv and "--compile-only" not in argv


def test_alternate_runs_a_b_a_b():
    calls = []

    class Runner:
        def __init__(self, name):
            self.name = name

        def run(self, n):
            calls.append(self.name)
            return [1.0] * n

    times = bench.alternate([Runner("A"), Runner("B")], rounds=3, steps=2)
    assert calls == ["A", "B"] * 3
    assert [len(t) for t in times] == [6, 6]


def write_metrics(run_dir, lines, partial_tail=""):
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in lines) + partial_tail
    (run_dir / "metrics.jsonl").write_text(text)


def fake_run(scale):
    lines = [{"step": 0, "first_step_s": 3.0}]
    for step in range(10, 110, 10):
        lines.append({"step": step, "loss": scale * 4.0 / (1 + step / 50), "lr": 1e-3,
                      "tokens_per_s": 2000.0, "grad_norm": 1.0, "tokens": step * 2048,
                      "time": step * 1.1})
        if step % 50 == 0:
            lines.append({"step": step, "val_loss": scale * 3.0 / (1 + step / 50),
                          "val_bpc": scale * 4.3 / (1 + step / 50), "time": step * 1.2})
    return lines


def test_plot_writes_a_png_of_two_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "a", fake_run(1.0))
    write_metrics(tmp_path / "b", fake_run(1.2), partial_tail='{"step": 110, "lo')
    out = tmp_path / "curves.png"
    plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000
    train, val = plot.read_metrics(tmp_path / "b")
    assert len(train) == 10 and [r["tokens"] for r in plot.with_tokens(train, val)] == [
        50 * 2048, 100 * 2048]


@pytest.mark.parametrize("make, needle", [(lambda p: None, "does not exist"),
                                          (lambda p: p.mkdir(), "metrics.jsonl")])
def test_plot_refuses_a_missing_run_or_metrics_file(tmp_path, capsys, make, needle):
    run = tmp_path / "run"
    make(run)
    with pytest.raises(SystemExit) as exc:
        plot.main([str(run), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and str(run) in err
    assert not (tmp_path / "x.png").exists()


def test_grid_table_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    points = config_lib.parse_grid("model.remat=none,full")
    results = [{"mode": "train", "tokens_per_s": 1234.0, "step_ms": 10.0,
                "temp_bytes": 2 ** 30}, {"overrides": points[1], "error": "out of memory"}]
    text = report.grid_markdown(points, results, "tiny train")
    assert "| model.remat | compile s |" in text
    assert "| none | - | 10.0 |" in text and "| full | failed: out of memory |" in text
    out = tmp_path / "grid.png"
    plot.grid_chart(points, results, out, "tiny train")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_bench_train_prints_every_column(capsys):
    result = bench.main(["--variant", "tiny", "--steps", "2", "--warmup", "1", *MICRO])
    out = capsys.readouterr().out
    row = out.strip().splitlines()[1]
    for key, title, _ in report.COLUMNS:
        assert f"{title} " in row
        assert result[key] > 0 if key != "mfu" else result[key] >= 0
    assert "- |" not in row and "MFU against" in out
    assert result["batch"] == 4 and result["seq_len"] == 16 and result["timed_steps"] == 2
    # tokens/s and MFU come from the pipelined run (one wait), not from the per-step latency
    assert result["tokens_per_s"] == pytest.approx(4 * 16 / (result["pipelined_step_ms"] / 1e3))


def test_bench_sample_reports_decode_speed(capsys):
    result = bench.main(["--variant", "tiny", "--mode", "sample", "--num-samples", "2",
                         "--rounds", "1", *MICRO])
    out = capsys.readouterr().out
    assert result["new_tokens"] == 16 and not result["slides"]  # fills the 16-token context
    assert result["tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert "decode tokens/s" in out and "16 new tokens" in out


def test_bench_torch_reports_a_ratio(capsys):
    pytest.importorskip("torch")
    result = bench.main(["--variant", "tiny", "--torch", "--steps", "2", "--rounds", "2",
                         "--warmup", "1", *MICRO])
    out = capsys.readouterr().out
    assert result["jax_torch_ratio"] > 0 and result["torch_tokens_per_s"] > 0
    assert result["timed_steps"] == 4 and result["torch_params"] == result["params"]
    assert result["torch_layout"] == "encoder"
    assert "JAX/PyTorch" in out and "torch tokens/s" in out


def test_shapes_needs_torch_and_tabulates_the_ratios(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes"])
    assert exc.value.code == 2
    assert "--shapes compares with PyTorch: add --torch" in capsys.readouterr().err
    seen = []

    def fake_bench_train(cfg, steps, warmup, compile_only, torch, rounds, float32_too):
        seen.append((cfg.model.d_model, cfg.train.batch_size, cfg.model.max_seq_length, torch,
                     rounds, float32_too))
        result = {"step_ms": 2.0, "torch_step_ms": 3.0, "jax_torch_ratio": 1.5,
                  "matmul_dtype": "bfloat16"}
        if cfg.model.d_model == 256:  # where products were bfloat16, also float32's
            result.update({"f32_step_ms": 6.0, "f32_torch_ratio": 0.5})
        return result

    monkeypatch.setattr(bench, "bench_train", fake_bench_train)
    results = bench.main(["--torch", "--shapes", "--rounds", "3"])
    assert seen == [(32, 16, 64, True, 3, True), (256, 16, 64, True, 3, True),
                    (256, 8, 256, True, 3, True)]
    assert [r["shape"] for r in results] == [name for name, _, _ in bench.SHAPES]
    out = capsys.readouterr().out
    assert ("| the default recipe (16 x 64, d_hid 512) | bfloat16 | 2.0 | 3.0 | 1.50x "
            "| 6.0 | 0.50x |") in out
    assert "| micro (d_model 32, 1 layer, 16 x 64) | bfloat16 | 2.0 | 3.0 | 1.50x " \
           "| (the same) |  |" in out


def test_profile_step_times_every_operation(capsys):
    pytest.importorskip("torch")
    from chatgot_jax.tools import profile_step

    result = profile_step.main(["--steps", "2", "--torch", "--top", "3", *MICRO])
    jx, pt = result["jax"], result["torch"]
    assert jx["ops_ms"] > 0 and jx["by_category"]["matmul"] > 0
    assert abs(sum(jx["by_category"].values()) - jx["ops_ms"]) < 1e-6
    assert jx["hlo"]["fusions"] > 0 and jx["hlo"]["dots"] > 0
    assert pt["by_category"]["matmul"] > 0 and pt["ops_per_step"] > 0
    out = capsys.readouterr().out
    assert "| matmul |" in out and "Top 3 JAX operations" in out


def test_bench_alternates_float32_products_where_they_are_bfloat16():
    pytest.importorskip("torch")
    cfg = config_lib.load_config("tiny", overrides=[*MICRO, "model.matmul_dtype=bfloat16"])
    r = bench.bench_train(cfg, 2, 1, False, torch=True, rounds=1, float32_too=True)
    assert r["matmul_dtype"] == "bfloat16" and r["timed_steps"] == 2
    assert r["f32_step_ms"] > 0 and r["f32_torch_ratio"] == pytest.approx(
        r["torch_step_ms"] / r["f32_step_ms"])
    cfg = config_lib.load_config("tiny", overrides=[*MICRO, "model.matmul_dtype=float32"])
    assert "f32_step_ms" not in bench.bench_train(cfg, 1, 1, False, torch=True,
                                                  float32_too=True)
