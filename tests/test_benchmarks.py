"""The benchmark scripts: medians with their spread, and `benchmarks/regenerate.py --quick`, which
runs every script that produces a README figure on tiny inputs (their figures mean nothing; the
point is that the scripts run and write their results with provenance, into the folder given)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.spread import compare, compare_summaries, format_overhead, format_ratio, summarize  # noqa: E402


def test_summarize_keeps_median_and_spread():
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4,
                                                 "samples": [3.0, 1.0, 2.0, 10.0]}
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


def test_a_ratio_whose_spread_includes_one_is_not_significant():
    clear = compare([1.0, 1.1, 0.9], [2.0, 2.2, 1.9])  # new takes twice as long, ranges apart
    assert clear["ratio"] == pytest.approx(2.0) and clear["significant"]
    assert clear["low"] == pytest.approx(1.9 / 1.1) and clear["high"] == pytest.approx(2.2 / 0.9)
    assert format_overhead(clear).startswith("+100% (+73% to +144%)")
    noisy = compare([0.16, 1.0, 0.5], [0.6, 0.2, 0.9])  # medians differ, ranges overlap
    assert not noisy["significant"] and format_overhead(noisy).endswith("not significant")
    faster = compare([2.0, 2.1], [1.0, 1.05])
    assert faster["significant"] and faster["high"] < 1
    assert format_ratio(clear) == "2.0x (1.7x-2.4x)" and format_ratio(noisy).endswith("not significant")
    # Results that kept only median / min / max compare the same way as their samples.
    assert compare_summaries(summarize([1.0, 1.1, 0.9]), summarize([2.0, 2.2, 1.9])) == clear


def test_regenerate_refuses_to_write_quick_figures_over_the_committed_results():
    result = subprocess.run([sys.executable, "benchmarks/regenerate.py", "--quick", "--out", "benchmarks/results"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "committed results" in result.stderr


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_regenerate_quick_runs_every_script_into_the_folder_given(tmp_path):
    committed = _digest(ROOT / "benchmarks" / "results")
    result = subprocess.run([sys.executable, "benchmarks/regenerate.py", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "regenerate.json").read_text())
    status = {step["step"]: step["status"] for step in summary["steps"]}
    for name in ("model-stats", "compile-check", "training-methods-step", "training-methods-ap", "demo-train"):
        assert status[name] == "ok", status
    expected = ["cpu-compile-check.json", "cpu-demo-train.json", "cpu-training-methods-ap.json",
                "cpu-training-methods-step.json", "model-stats.json", "regenerate.json"]
    if status["kernels"] == "ok":
        expected.append("cpu-msda.json")
    for name in expected:
        data = json.loads((tmp_path / name).read_text())
        for key in ("device", "torch", "git_commit", "git_dirty", "command"):
            assert key in data, f"{name} lacks {key}"
        assert data["quick"] is True
    demo = json.loads((tmp_path / "cpu-demo-train.json").read_text())
    assert demo["train_command"].startswith("torchrun -m dimaskdino.train")
    assert demo["wall_clock_s"]["n"] == 1 and demo["metrics"]["steps"] == 2
    assert (tmp_path / demo["picture"]).stat().st_size > 0
    step = json.loads((tmp_path / "cpu-training-methods-step.json").read_text())
    assert set(step["rows"]["off"]["step_s"]) >= {"median", "min", "max", "samples"}
    assert _digest(ROOT / "benchmarks" / "results") == committed  # nothing written over the committed results


# ---------------------------------------------------------------------------------------------
# benchmarks/kernels.py times nothing that is wrong: every row is checked against float64 first


def test_topk_check_catches_a_wrong_selection():
    from benchmarks.kernels import topk_error_vs_float64

    scores64 = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    good = topk_error_vs_float64(scores64[:, [1, 0]].float(), torch.tensor([[1, 0]]), scores64, 2)
    assert max(good.values()) < 1e-6  # the same tokens in another order are a correct top-2
    wrong = topk_error_vs_float64(torch.tensor([[5.0, 3.0]]), torch.tensor([[0, 2]]), scores64, 2)
    assert wrong["selection"] == pytest.approx(0.25)  # picked 3 where the 2nd best is 4
    twice = topk_error_vs_float64(torch.tensor([[5.0, 5.0]]), torch.tensor([[0, 0]]), scores64, 2)
    assert twice["duplicates"] == 1.0


def test_mask_loss_rows_that_disagree_with_float64_are_not_timed(monkeypatch):
    """A fused loss 1 % off: its rows are marked incorrect and carry no time; the reference rows
    (correct) are timed."""
    import benchmarks.kernels as kernels
    import dimaskdino.ops

    real = dimaskdino.ops.point_mask_loss

    def one_percent_off(*args, **kwargs):
        bce, dice = real(*args, **kwargs)
        return bce * 1.01, dice

    monkeypatch.setattr(dimaskdino.ops, "point_mask_loss", one_percent_off)
    monkeypatch.setattr(kernels, "QUICK", True)
    monkeypatch.setattr(kernels, "COMPILE", "none")  # Inductor compiles would take minutes here
    rows = kernels.bench_mask_loss(torch.device("cpu"), reps=1, peak_gbs=1.0)
    by_key = {(row["mode"], row["impl"]): row for row in rows}
    wrong = by_key[("mask loss fwd+bwd", "fused-pytorch")]
    assert wrong.get("incorrect") and "median_ms" not in wrong and wrong["relative_error_vs_float64"]["loss"] > 1e-3
    assert "median_ms" in by_key[("mask loss fwd+bwd", "reference")]
    assert "median_ms" in by_key[("matcher cost", "fused-pytorch")]  # the matcher path does not use the loss


def test_readme_figures_match_the_committed_results():
    """Every table of figures in the README is what benchmarks/readme_figures.py renders from the
    committed result files, and those were written from clean trees."""
    from benchmarks.readme_figures import README, differences

    assert differences(README.read_text()) == []


def test_readme_figures_check_catches_an_edited_figure_and_a_dirty_result(tmp_path, monkeypatch):
    import benchmarks.readme_figures as figures

    readme = figures.README.read_text()
    demo = figures.demo()
    edited = readme.replace(demo, demo.replace("**", "*", 1), 1)
    assert edited != readme and any(problem.startswith("demo:") for problem in figures.differences(edited))

    # The same file, as if written from a dirty tree: not a result the README may quote.
    data = json.loads((figures.RESULTS / "cpu-demo-train.json").read_text())
    (tmp_path / "cpu-demo-train.json").write_text(json.dumps({**data, "git_dirty": True}))
    monkeypatch.setattr(figures, "RESULTS", tmp_path)
    with pytest.raises(figures.MissingResult, match="dirty tree"):
        figures.demo()


def test_no_benchmark_script_writes_into_the_committed_results_by_default():
    """benchmarks/results/ is updated on purpose (--out benchmarks/results), never by a plain run."""
    offenders = []
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for line in script.read_text().splitlines():
            if '"--out"' in line and "default=" in line and '"results"' in line:
                offenders.append(f"{script.name}: {line.strip()}")
    assert offenders == []
