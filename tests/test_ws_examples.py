"""Smoke runs of examples/ws_metric.py and examples/skillit_lego.py at tiny sizes (peers skipped when absent)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ws_metric_example():
    out = run("examples/ws_metric.py", "--n", "300", "--seeds", "1")
    for heading in ("## Metric label spaces", "## Binary and multiclass", "## Real-valued LFs"):
        assert heading in out
    assert "| rankings | 300 |" in out and "| 3 | shammie model |" in out


def test_skillit_lego_example(tmp_path):
    pytest.importorskip("transformers")
    out = run("examples/skillit_lego.py", "--steps", "20", "--eval-every", "10", "--graph", "estimate",
              "--graph-warmup", "4", "--graph-steps", "3", "--depth", "3", "--plot", str(tmp_path / "p.png"))
    assert "skills graph (estimate, 13 extra training steps)" in out
    assert "seed 0: final mean accuracy uniform" in out and "| 20 |" in out
