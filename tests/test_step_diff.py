"""tools/step_diff: where two runs' step-by-step losses part."""

import json

import pytest

from chatgot_jax.errors import UserError
from chatgot_jax.tools import step_diff

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, records):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_first_steps_above_each_threshold_stretches_and_a_resumed_step(tmp_path):
    # b drifts from a by 10^(step/10 - 7.05): above 1e-5 from step 21 on, above 1e-4
    # from 31, and so on.
    a = [{"step": s, "loss": 3.0} for s in range(1, 61)]
    b = [{"step": s, "loss": 3.0 + 10 ** (s / 10 - 7.05)} for s in range(1, 61)]
    # A resumed run logs steps 31-40 twice: the later record counts.
    b = b[:40] + [{"step": s, "loss": 99.0} for s in range(31, 41)] + b[30:]
    a.append({"step": 60, "val_loss": 2.5, "val_bpc": 3.6})
    b.append({"step": 60, "val_loss": 2.4, "val_bpc": 3.5})
    write_run(tmp_path / "a", a)
    write_run(tmp_path / "b", b)
    result = step_diff.compare(tmp_path / "a", tmp_path / "b")
    assert result["steps"] == 60
    assert result["first_step_above"] == {"1e-05": 21, "0.0001": 31, "0.001": 41, "0.01": 51}
    assert [r["steps"] for r in result["stretches"]] == ["1-10", "11-60"]
    assert result["stretches"][0]["max"] == pytest.approx(10 ** -6.05, rel=1e-6)
    assert result["stretches"][1]["max"] == pytest.approx(10 ** -1.05, rel=1e-6)
    assert [r["step"] for r in result["table"]] == [1, 2, 5, 10, 50]
    assert result["val"] == [{"step": 60, "a": 2.5, "b": 2.4, "diff": pytest.approx(0.1)}]
    text = step_diff.markdown(result, "JAX", "PyTorch")
    assert "1e-05: step 21" in text and "| 50 | 3.000000 |" in text


def test_the_command_draws_and_refuses_runs_without_a_shared_step(tmp_path, capsys):
    write_run(tmp_path / "a", [{"step": s, "loss": 3.0 - s / 100} for s in range(1, 5)])
    write_run(tmp_path / "b", [{"step": s, "loss": 3.0 - s / 100} for s in range(1, 5)])
    write_run(tmp_path / "c", [{"step": s, "loss": 3.0} for s in range(7, 9)])
    out = tmp_path / "diff.png"
    step_diff.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                    "--json", str(tmp_path / "r.json")])
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((tmp_path / "r.json").read_text())["first_step_above"]["0.01"] is None
    with pytest.raises(SystemExit) as stop:
        step_diff.main([str(tmp_path / "a"), str(tmp_path / "c")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "share no logged training step" in err[0]
    with pytest.raises(UserError, match="does not exist"):
        step_diff.compare(tmp_path / "a", tmp_path / "missing")
