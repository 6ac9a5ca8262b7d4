"""The experiments' task generators and command line: label placement, vocabulary ranges, the gap
law, determinism, and errors that name the bad option."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from titans_layers.experiments.cli import build_parser, main, parse_value, settings_from_args
from titans_layers.experiments.models import count_params, matched_width, skip_reason
from titans_layers.experiments.tasks import IGNORE, MQAR, NIAH, ByteLM, make_task
from titans_layers.experiments.tasks.base import FILLER, KEY, QUERY, VALUE
from titans_layers.experiments.tasks.mqar import gap_probabilities
from titans_layers.experiments.tasks.niah import DIGIT0, KEY0, NEEDLE, QUESTION


@st.composite
def mqar_settings(draw):
    V = draw(st.integers(8, 300))
    T = draw(st.integers(8, 200))
    N = draw(st.integers(1, max(1, min(T // 4, V // 2 - 1))))
    return MQAR(seq_len=T, num_kv_pairs=N, vocab_size=V, power_a=draw(st.sampled_from([0.01, 0.5, 1.0])),
                random_filler=draw(st.booleans()))


@given(mqar_settings(), st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_mqar_layout(task, seed, B):
    b = task.sample(B, np.random.default_rng(seed))
    T, N, V = task.seq_len, task.num_kv_pairs, task.vocab_size
    assert b.inputs.shape == b.targets.shape == (B, T)
    assert b.inputs.min() >= 0 and b.inputs.max() < V
    for i in range(B):
        keys, values = b.inputs[i, 0:2 * N:2], b.inputs[i, 1:2 * N:2]
        assert len(set(keys)) == N and len(set(values)) == N
        assert keys.min() >= 1 and keys.max() < V // 2  # keys from [1, V/2)
        assert values.min() >= V // 2 and values.max() < V  # values from [V/2, V)
        labelled = np.nonzero(b.targets[i] != IGNORE)[0]
        assert len(labelled) == N  # one label per query, nowhere else
        assert labelled.min() >= 2 * N and np.all((labelled - 2 * N) % 2 == 0)
        pair = dict(zip(keys.tolist(), values.tolist()))
        for t in labelled:  # the label at a query key is that key's value
            assert b.roles[i, t] == QUERY
            assert b.targets[i, t] == pair[int(b.inputs[i, t])]
            key_pos = 2 * keys.tolist().index(int(b.inputs[i, t]))
            assert b.meta["distance"][i, t] == t - key_pos
        assert sorted(b.inputs[i, labelled].tolist()) == sorted(keys.tolist())  # every key asked once
        assert np.all(b.roles[i, 0:2 * N:2] == KEY) and np.all(b.roles[i, 1:2 * N:2] == VALUE)
        if not task.random_filler:
            assert np.all(b.inputs[i][b.roles[i] == FILLER] == 0)


@given(mqar_settings(), st.integers(0, 2**31 - 1))
def test_mqar_deterministic(task, seed):
    a = task.sample(3, np.random.default_rng(seed))
    b = task.sample(3, np.random.default_rng(seed))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
    c = task.sample(3, np.random.default_rng(seed + 1))
    assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize("power_a", [0.01, 0.3, 1.0])
def test_mqar_gap_law(power_a):
    """Empirical gap frequencies follow P(g) ∝ (g+1)^(a-1), sampled without replacement per example:
    with one pair per example the draw is exactly the law."""
    task = MQAR(seq_len=64, num_kv_pairs=1, vocab_size=16, power_a=power_a)
    b = task.sample(20000, np.random.default_rng(0))
    gaps = (np.nonzero(b.targets != IGNORE)[1] - 2) // 2
    space = (64 - 2) // 2
    freq = np.bincount(gaps, minlength=space) / len(gaps)
    p = gap_probabilities(space, power_a)
    assert np.abs(freq - p).max() < 0.015
    if power_a < 1:
        assert freq[0] > freq[-1] * 2  # short gaps dominate
    else:
        assert np.abs(p - 1 / space).max() < 1e-12


@pytest.mark.parametrize("kwargs, name", [(dict(num_kv_pairs=40, seq_len=128, vocab_size=256), "num_kv_pairs"),
                                          (dict(num_kv_pairs=8, vocab_size=16), "num_kv_pairs"),
                                          (dict(power_a=0.0), "power_a"), (dict(seq_len=0), "seq_len")])
def test_mqar_bad_settings_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        MQAR(**kwargs)


@given(st.integers(40, 300), st.sampled_from(["pattern", "random"]), st.integers(1, 6),
       st.one_of(st.none(), st.floats(0, 1)), st.integers(0, 1000))
def test_niah_layout(T, haystack, m, depth, seed):
    task = NIAH(seq_len=T, value_len=m, haystack=haystack)
    b = task.sample(4, np.random.default_rng(seed), depth=depth)
    assert b.inputs.shape == (4, T) and b.inputs.min() >= 0 and b.inputs.max() < task.vocab_size
    q = T - (m + 2)
    for i in range(4):
        p = b.meta["needle_pos"][i]
        assert b.inputs[i, p] == NEEDLE and KEY0 <= b.inputs[i, p + 1] < KEY0 + task.num_keys
        digits = b.inputs[i, p + 2:p + 2 + m]
        assert np.all((digits >= DIGIT0) & (digits < DIGIT0 + 10))
        assert p + 2 + m <= q  # the needle is inside the haystack
        assert b.inputs[i, q] == QUESTION and b.inputs[i, q + 1] == b.inputs[i, p + 1]
        assert np.array_equal(b.inputs[i, q + 2:], digits)  # the answer, teacher-forced
        labelled = np.nonzero(b.targets[i] != IGNORE)[0]
        assert labelled.tolist() == list(range(q + 1, q + 1 + m))
        assert np.array_equal(b.targets[i, labelled], digits)
        hay = np.ones(T, bool)
        hay[p:p + 2 + m] = False
        hay[q:] = False
        assert np.all(b.inputs[i, hay] >= KEY0 + task.num_keys)  # noise never looks like a key or digit
        if depth is not None:
            assert p == round(depth * (q - m - 2))
    again = task.sample(4, np.random.default_rng(seed), depth=depth)
    assert np.array_equal(again.inputs, b.inputs)


def test_niah_longer_contexts_and_errors():
    task = NIAH(seq_len=64)
    b = task.sample(2, np.random.default_rng(0), seq_len=4096, depth=0.0)
    assert b.inputs.shape == (2, 4096) and np.all(b.meta["needle_pos"] == 0)
    with pytest.raises(ValueError, match="`depth`"):
        task.sample(2, np.random.default_rng(0), depth=1.5)
    with pytest.raises(ValueError, match="`haystack`"):
        NIAH(haystack="hay")


def test_lm_stdlib_windows(tmp_path):
    task = ByteLM(seq_len=64, max_bytes=200_000)
    train_bytes, held = task.num_bytes
    assert train_bytes + held == 200_000 and held == pytest.approx(20_000, abs=1)
    b = task.sample(4, np.random.default_rng(0))
    assert b.inputs.shape == (4, 64) and b.inputs.max() < 256
    assert np.array_equal(b.inputs[:, 1:], b.targets[:, :-1])  # next-byte targets
    batches = task.held_out_batches(8, 20)
    assert sum(x.inputs.shape[0] for x in batches) == 20
    text = tmp_path / "t.txt"
    text.write_bytes(b"abcdefgh" * 2000)
    small = ByteLM(seq_len=16, text_file=str(text))
    assert set(np.unique(small.sample(2, np.random.default_rng(1)).inputs)) <= set(b"abcdefgh")
    with pytest.raises(ValueError, match="`text_file`"):
        ByteLM(text_file=str(tmp_path / "missing.txt"))


def test_make_task_rejects_unknown_options():
    with pytest.raises(ValueError, match="no option"):
        make_task("mqar", num_pairs=3)
    with pytest.raises(ValueError, match="`task`"):
        make_task("copy")


def test_models_match_parameters_and_skip_fla_on_cpu():
    ref = count_params("lmm", 64, 128, 64, {})
    for name in ("mac", "mal", "mag", "lmm-mlp", "mac_mal", "swa", "attn"):
        width = matched_width(name, 64, 128, ref, {})
        assert abs(count_params(name, 64, 128, width, {}) / ref - 1) <= 0.10, name
    assert skip_reason("mamba2", "cpu") is not None and "CUDA" in skip_reason("mamba2", "cpu")
    assert skip_reason("lmm", "cpu") is None
    with pytest.raises(ValueError, match="--models"):
        skip_reason("transformer", "cpu")


def test_set_values_parse():
    assert [parse_value(v) for v in ("3", "0.5", "true", "none", "silu")] == [3, 0.5, True, None, "silu"]


@pytest.mark.parametrize("argv, option", [
    (["mqar", "--seq-len", "0"], "--seq-len"),
    (["mqar", "--seq-len", "abc"], "--seq-len"),
    (["mqar", "--num-kv-pairs", "40", "--seq-len", "64"], "--num-kv-pairs"),
    (["mqar", "--vocab-size", "x"], "--vocab-size"),
    (["mqar", "--num-kv-pairs", "20", "--vocab-size", "16"], "--num-kv-pairs"),
    (["mqar", "--models", "lmm,gpt"], "--models"),
    (["mqar", "--steps", "-5"], "--steps"),
    (["mqar", "--batch-size", "0"], "--batch-size"),
    (["mqar", "--lr", "-1"], "--lr"),
    (["mqar", "--seed", "-1"], "--seed"),
    (["mqar", "--device", "tpu7"], "--device"),
    (["mqar", "--set", "chunk_size"], "--set"),
    (["mqar", "--set", "no_such_option=1"], "--set"),
    (["mqar", "--set", "chunk_size=0", "--models", "lmm"], "--set: `chunk_size`"),
    (["mqar", "--set", "lr=-1", "--models", "lmm"], "--set: `lr`"),
    (["mqar", "--eval-loads", "100"], "--eval-loads"),
    (["niah", "--depths", "0.5,2"], "--depths"),
])
def test_cli_errors_name_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        parser = build_parser()
        settings_from_args(parser.parse_args(argv), parser)
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_cli_unknown_task(capsys):
    with pytest.raises(SystemExit):
        main(["copy"])
    assert "task" in capsys.readouterr().err


def test_cli_plans_the_sweep_grid():
    parser = build_parser()
    s = settings_from_args(parser.parse_args(["mqar", "--models", "lmm,swa,mamba2", "--set", "chunk_size=8,16",
                                              "--set", "lr=0.001,0.003"]), parser)
    assert len(s["specs"]) == 2 * 2 * 2
    assert [x["model"] for x in s["skipped"]] == ["mamba2"]
    points = {(r.overrides["chunk_size"], r.overrides["lr"]) for r in s["specs"]}
    assert points == {(8, 0.001), (8, 0.003), (16, 0.001), (16, 0.003)}
    assert all(r.model_options["chunk_size"] == r.overrides["chunk_size"] for r in s["specs"])
    assert all(r.train["lr"] == r.overrides["lr"] for r in s["specs"])
