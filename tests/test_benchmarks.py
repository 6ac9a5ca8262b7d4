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
