"""The benchmark scripts run end to end (tiny sizes, CPU interpreter off CUDA) and write JSON and
Markdown whose entries for our providers carry timings, not errors; the CPU peak-memory probe
measures what a call allocates."""

import json

import pytest
import torch

from benchmarks import common
from benchmarks.layers import benchmark_layers
from benchmarks.models import benchmark_models
from benchmarks.ops import benchmark_mlp_memory, benchmark_momentum_delta_rule

SCRIPTS = {
    "ops": (benchmark_momentum_delta_rule, ["--quick", "--seqlens", "40", "--heads", "1", "--head-dims", "16",
                                           "--chunk-sizes", "16", "--dtype", "fp32"], "momentum_delta_rule"),
    "ops_mlp": (benchmark_mlp_memory, ["--quick", "--seqlens", "40", "--heads", "1", "--head-dims", "16",
                                       "--expansions", "2", "--chunk-sizes", "16", "--dtype", "fp32"], "mlp_memory"),
    "layers": (benchmark_layers, ["--quick", "--seqlens", "40", "--hidden", "32", "--head-dims", "16",
                                  "--dtype", "fp32"], "titans"),
    "models": (benchmark_models, ["--quick", "--seqlens", "32", "--modes", "fwd,fwdbwd"], "titans"),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_benchmark_script_writes_results(name, tmp_path):
    module, argv, ours = SCRIPTS[name]
    module.main([*argv, "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    (md_path,) = tmp_path.glob("*.md")
    result = json.loads(json_path.read_text())
    assert {"device", "versions"} <= set(result["environment"])
    mine = [e for e in result["entries"] if e["provider"].startswith(ours)]
    assert mine and all(e["error"] is None and e["median_ms"] > 0 for e in mine), mine
    assert {e["mode"] for e in mine} == {"fwd", "fwdbwd"}
    report = md_path.read_text()
    assert report.startswith("# ") and "| ---" in report  # a titled report with its tables


@pytest.mark.skipif(common.cpu_peak_memory_mb(lambda: None) is None,
                    reason="needs Linux /proc/self/clear_refs and glibc's malloc_trim")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_peak_memory_counts_what_one_call_allocates(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        held = torch.ones(2**24)  # 64 MiB alive before the call: not counted
        touched = common.cpu_peak_memory_mb(lambda: torch.ones(2**24).add_(held).sum())  # 64 MiB, written
        nothing = common.cpu_peak_memory_mb(lambda: None)
    finally:
        torch.set_num_threads(before)
    assert 60 <= touched <= 200, touched
    assert nothing < 16, nothing


def test_mlp_launch_settings_get_their_own_columns_and_ratios(capsys):
    """``benchmark_mlp_memory --launches``: each setting is its own provider column with ratios to
    the default launch and to fla; settings are parsed before anything runs, and off CUDA refused."""
    mlp = benchmark_mlp_memory
    assert mlp.parse_launch("default") == {} and mlp.parse_launch("BT=16, fwd_warps=4") == {"BT": 16, "fwd_warps": 4}
    assert mlp.launch_provider(mlp.OURS, "BT=16") == "mlp_memory[BT=16]"
    assert mlp.launch_provider(mlp.FLA_GATED, "BT=16") == mlp.FLA_GATED
    with pytest.raises(ValueError, match="field=int"):
        mlp.parse_launch("BT:16")
    with pytest.raises(SystemExit):
        mlp.parse_args(["--cpu", "--launches", "default;BT=16"])
    assert "CUDA only" in capsys.readouterr().err
    args = mlp.parse_args(["--cpu", "--providers", "mlp_memory,fla_chunk_gated_delta_rule"])
    args.launches = ["default", "BT=16"]
    shape = dict(mode="fwd", B=1, T=64, H=1, K=16, V=16, Dh=32, chunk_size=16, dtype="fp32", p20_ms=None,
                 p80_ms=None, tokens_per_s=None, peak_mem_mb=None, error=None)
    entries = [mlp.Entry(provider=p, median_ms=ms, **shape)
               for p, ms in (("mlp_memory", 2.0), ("mlp_memory[BT=16]", 3.0), ("fla_chunk_gated_delta_rule", 1.0))]
    report = mlp.markdown_report(entries, {}, {"device_type": "cuda"}, args)
    header = next(line for line in report.splitlines() if line.startswith("| B |"))
    assert "mlp_memory[BT=16] / mlp" in header and "mlp_memory[BT=16] / gated_delta" in header
    row = next(line for line in report.splitlines() if line.startswith("| 1 | 64 |"))
    assert "1.50x" in row and "3.00x" in row  # 3 / 2 and 3 / 1


def test_mlp_benchmark_sweeps_batch_sizes():
    """``benchmark_mlp_memory --batch 1,8``: every shape at each B (our kernels' grid is B * H)."""
    args = benchmark_mlp_memory.parse_args(["--cpu", "--batch", "1,3", "--seqlens", "40,80", "--heads", "2"])
    shapes = benchmark_mlp_memory.shapes(args)
    assert sorted((s.B, s.T) for s in shapes) == sorted([(1, 40), (1, 80), (3, 40), (3, 80)] * 3)  # 3 chunk sizes
    assert benchmark_mlp_memory.parse_args(["--cpu"]).batch == [1]


def test_kernel_resources_writes_per_token_counts(tmp_path):
    """``benchmarks.kernel_resources`` end to end on the decode kernels of the MLP memory for sm_90
    (fast to compile; no per-token columns), and one chunk kernel's row with its per-token counts."""
    from benchmarks import kernel_resources
    from titans_layers.testing.kernel_builds import MLP_KERNELS, mlp_build

    kernel_resources.main(["--match", "fused_recurrent_mlp", "--capabilities", "90", "--jobs", "2",
                           "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert len(rows) == 4 and all(r["sm"] == 90 and r["registers"] > 0 for r in rows)
    assert all(r[c] == "-" for r in rows for c in kernel_resources.TOKEN_COLUMNS)
    row = kernel_resources.measure(mlp_build(MLP_KERNELS[0], 64, 256, 64, "bf16", 0, False, False, capability=90))
    assert all(row[c] > 0 for c in kernel_resources.TOKEN_COLUMNS if c != "spill KB / token")
    # the forward's state traffic per tile and Dh block: the anchor copy (2 loads, 2 stores; counted
    # in every tile, as static counts weigh no branch), pass 1 (2 loads), pass 2 (6 loads, 4 stores,
    # 4 tile-state stores) of [64, 32] float32; 8 blocks, 32 tokens a tile; plus a token's own inputs
    state_kb = 20 * 64 * 32 * 4 * 8 / 32 / 1024
    assert row["BH"] == 32 and state_kb <= row["global KB / token"] <= state_kb + 2, row
