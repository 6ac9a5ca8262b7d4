"""The experiments end to end: a short fixed-seed training that must learn an easy MQAR case, and
reports (results.json, report.md, plots) written and parseable for every task."""

import json

import numpy as np
import pytest
import torch

from titans_layers.experiments.cli import main
from titans_layers.experiments.evaluation import evaluate_mqar
from titans_layers.experiments.models import build_model
from titans_layers.experiments.tasks import MQAR
from titans_layers.experiments.training import TrainConfig, lr_factor, train


def test_lr_schedule():
    f = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # then non-increasing
    assert f[-1] == pytest.approx(0.1, abs=0.01)  # cosine to 10%


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match="`steps`"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="`warmup`"):
        TrainConfig(warmup=1.5)


LEARN_TASK = dict(seq_len=32, num_kv_pairs=4, vocab_size=32)
LEARN_STEPS = 200
LEARN_THRESHOLD = 0.9


def test_memory_model_learns_easy_mqar():
    """A 2-layer LMM (linear memory, library defaults) trained for a fixed 200 steps on MQAR with 4
    pairs in 32 tokens must recall >= 90% of held-out queries; chance is 1/16."""
    torch.set_num_threads(1)
    task = MQAR(**LEARN_TASK)
    built = build_model("lmm", task.vocab, task.seq_len, {}, seed=0)
    res = train(built.model, task, TrainConfig(steps=LEARN_STEPS, batch_size=32, lr=3e-3, eval_every=0, seed=0),
                torch.device("cpu"), progress=False)
    assert res.steps == LEARN_STEPS and not res.interrupted
    m = evaluate_mqar(built.model, task, torch.device("cpu"), seed=0, num_examples=128)
    assert m["accuracy"] >= LEARN_THRESHOLD, m


def test_early_stop_and_stop_request():
    task = MQAR(**LEARN_TASK)
    built = build_model("swa", task.vocab, task.seq_len, {"hidden_size": 32}, seed=0)
    calls = []
    res = train(built.model, task, TrainConfig(steps=50, batch_size=4, eval_every=0), torch.device("cpu"),
                progress=False, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert res.interrupted and res.steps == 3
    res = train(built.model, task, TrainConfig(steps=50, batch_size=4, eval_every=2, target_accuracy=1e-9),
                torch.device("cpu"), progress=False)
    assert res.early_stopped and res.steps == 2


def _run(tmp_path, argv):
    out = tmp_path / "report"
    code = main(argv + ["--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for key in ("runs", "versions", "device", "wall_s", "task", "command"):
        assert key in results
    for run in results["runs"]:
        assert run["status"] == "ok", run.get("traceback")
        for key in ("model", "params", "config", "metrics"):
            assert key in run
    for png in results["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in report
    return results, report


def test_mqar_report(tmp_path, capsys):
    results, report = _run(tmp_path, ["mqar", "--models", "lmm,swa,mamba2", "--seq-len", "32", "--num-kv-pairs", "4",
                                      "--vocab-size", "32", "--steps", "3", "--batch-size", "4", "--eval-examples",
                                      "8", "--set", "chunk_size=8"])
    assert [r["model"] for r in results["runs"]] == ["lmm", "swa"]
    assert results["skipped"][0]["model"] == "mamba2" and "CUDA" in results["skipped"][0]["reason"]
    lmm, swa = results["runs"]
    assert lmm["config"]["chunk_size"] == 8 and abs(swa["params"] / lmm["params"] - 1) <= 0.1
    assert 0 <= lmm["metrics"]["accuracy"] <= 1 and lmm["metrics"]["accuracy_by_distance"]
    assert set(lmm["metrics"]["accuracy_by_load"]) == {"2", "4", "8"}
    gates = lmm["gates"]
    assert len(gates) == 2 and "swa" not in [r["model"] for r in results["runs"] if r.get("gates")]
    theta = np.array(gates[0]["theta"]["hist"])
    assert theta.sum() == 4 * 32 * 2 * 2 and gates[0]["theta"]["quantiles"]["p95"] <= 0.1  # [B, T, H] values
    assert set(gates[0]["theta"]["mean_by_role"]) >= {"key", "value", "query"}
    assert gates[0]["norm_positions"] == [8, 16, 24, 32]
    assert "| lmm chunk_size=8 |" in report and "skipped" in report
    assert "report:" in capsys.readouterr().out


def test_niah_report(tmp_path):
    results, report = _run(tmp_path, ["niah", "--models", "lmm", "--seq-len", "48", "--steps", "2", "--batch-size",
                                      "2", "--eval-lengths", "48,96", "--depths", "0,1", "--eval-examples", "2"])
    acc = results["runs"][0]["metrics"]["accuracy"]
    assert set(acc) == {"48", "96"} and set(acc["48"]) == {"0", "1"}
    assert "Accuracy by length and depth" in report


def test_lm_report(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(32, 127)) * 300)
    results, _ = _run(tmp_path, ["lm", "--models", "lmm", "--text-file", str(text), "--seq-len", "32", "--steps",
                                 "2", "--batch-size", "2", "--eval-examples", "4"])
    m = results["runs"][0]["metrics"]
    assert 0 < m["bits_per_byte"] < 12 and len(m["loss_by_position"]) == 8
