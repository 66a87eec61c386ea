"""``python -m ferrograd inspect``: prints the training graph of a model in a file."""

import subprocess
import sys
from pathlib import Path

MODEL = '''
import ferrograd as fg

@fg.model
def mlp(x: fg.f32["B", 4], y: fg.i32["B"]):
    logits = fg.nn.linear(fg.relu(fg.nn.linear(x, 8)), 3)
    return {"loss": fg.cross_entropy(logits, y), "logits": logits}
'''


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferrograd", *args], capture_output=True,
                          text=True, check=False)


def test_inspect_prints_summary_and_graph(tmp_path: Path) -> None:
    file = tmp_path / "model.py"
    file.write_text(MODEL)
    dot = tmp_path / "g.dot"
    res = run("inspect", f"{file}:mlp", "--dim", "B=2", "--optimizer", "adam",
              "--dot", str(dot))
    assert res.returncode == 0, res.stderr
    assert "model mlp for backend numpy" in res.stdout
    assert "inputs: x f32[2, 4], y i32[2]" in res.stdout
    assert "matmul(" in res.stdout and "model.py:6" in res.stdout
    assert dot.read_text().startswith('digraph "mlp"')


def test_inspect_cpu_prints_schedule_plan_and_rust(tmp_path: Path) -> None:
    file = tmp_path / "model.py"
    file.write_text(MODEL)
    res = run("inspect", f"{file}:mlp", "--dim", "B=2", "--backend", "cpu")
    assert res.returncode == 0, res.stderr
    assert "schedule train:" in res.stdout and "memory plan: peak" in res.stdout
    assert "#[pymodule]" in res.stdout and "pub fn forward_k00_matmul_add_relu(" in res.stdout


def test_inspect_reports_unbound_dim_and_missing_model(tmp_path: Path) -> None:
    file = tmp_path / "model.py"
    file.write_text(MODEL)
    res = run("inspect", f"{file}:mlp")
    assert res.returncode == 1
    assert "'B'" in res.stderr and "not bound" in res.stderr and "model.py:4" in res.stderr
    res = run("inspect", f"{file}:nope", "--dim", "B=2")
    assert res.returncode != 0 and "found: mlp" in res.stderr
