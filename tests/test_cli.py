"""The `shammie` command line: `info` prints the build, `bench` prints a table and writes JSON."""

import json
import os
import subprocess
import sys

import torch

from shammie.benchmarks import registry


def run(*args):
    return subprocess.run([sys.executable, "-m", "shammie", *args], capture_output=True, text=True, timeout=300)


def test_info_prints_the_build():
    result = run("info")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {"shammie_version", "torch_version", "cuda", "cpu_kernels"} <= set(info)
    # An argument error raised inside the extension reaches Python (a child process checks).
    assert info["cpp_errors"] == "ok"


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--ops", "causal_conv1d", "--min-run-time", "0.01", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "causal_conv1d" in result.stdout and "peer fwd ms" in result.stdout
    data = json.loads(out.read_text())
    expected_rows = len(registry.cases(["causal_conv1d"], torch.device("cpu")))
    assert data["meta"]["machine"] and len(data["rows"]) == expected_rows > 0
    assert all(row["ours_fwd_s"] > 0 and row["peer_fwd_s"] > 0 for row in data["rows"])


def test_bench_rejects_unknown_ops_and_missing_cuda():
    result = run("bench", "--ops", "no_such_op")
    assert result.returncode == 2 and "unknown op(s) ['no_such_op']" in result.stderr
    import torch

    if not torch.cuda.is_available():
        result = run("bench", "--device", "cuda")
        assert result.returncode == 2 and "torch sees no CUDA device" in result.stderr


def test_bench_checks_json_path_and_min_run_time_before_measuring(tmp_path):
    """An unwritable --json path was found after the first measurement (a traceback); a non-positive
    --min-run-time was accepted. Both are argument errors (exit 2) before anything runs."""
    result = run("bench", "--ops", "causal_conv1d", "--json", str(tmp_path / "missing" / "x.json"))
    assert result.returncode == 2 and "--json" in result.stderr and "cannot write" in result.stderr
    assert "Traceback" not in result.stderr and "measured" not in result.stderr
    assert not (tmp_path / "missing").exists()
    for value in ("-1", "0", "nan"):
        result = run("bench", "--ops", "causal_conv1d", "--min-run-time", value)
        assert result.returncode == 2 and "--min-run-time: expected a positive number of seconds" in result.stderr


def test_host_overhead_benchmark_prints_every_row(capsys):
    from shammie.benchmarks import host_overhead

    threads = torch.get_num_threads()
    try:
        host_overhead.main(["--calls", "3", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# host time per call on cpu")
    assert {"MoReLinear (4 blocks, rank 4) fwd+bwd", "selective_state_update (decode step)"} <= {
        line[:60].strip() for line in lines[1:]}
    assert all(float(line[60:].split()[0]) > 0 for line in lines[1:])


def test_more_profile_reports_each_layer(capsys):
    from shammie.benchmarks import more_profile

    more_profile.main(["--device", "cpu", "--dtype", "float32", "--tokens", "4", "--steps", "1", "--top", "2",
                       "--impls", "gemm", "dense"])
    reports = [line for line in capsys.readouterr().out.splitlines() if " ms/step" in line]
    assert any("| MoReLinear [dense]: wall" in line for line in reports)
    assert len(reports) in (6, 8)   # per shape: the base, MoRe twice, and LoRA where peft is installed
    assert "SHAMMIE_MONARCH_IMPL" not in os.environ
