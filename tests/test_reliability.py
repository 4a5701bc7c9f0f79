"""Reliability through the real entry points: a diverging run never writes a non-finite
checkpoint and names one that resumes; a damaged checkpoint is skipped by resume; every CLI error
is one line on stderr (also under torchrun)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import ROOT, TINY, loss_records

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ENV.pop("DIMASKDINO_DEBUG", None)


def train_command(output_dir: Path, cache_dir: Path, overrides: list[str], nproc: int = 0) -> list[str]:
    args = [f"train.output_dir={output_dir}", f"data.cache_dir={cache_dir}", *TINY, "train.eval_period=-1", *overrides]
    if nproc == 0:  # plain python, no torchrun
        return [sys.executable, "-m", "dimaskdino.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dimaskdino.train", *args]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor of a DCP checkpoint, read into one process (format_utils' converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    state = torch.load(target, weights_only=False)
    target.unlink()
    tensors = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)

    walk("", state)
    return tensors


def test_diverging_run_writes_only_finite_checkpoints_and_names_one_that_resumes(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run(train_command(out, cache, ["train.lr=1e3", "train.warmup_iters=0", "train.max_steps=30",
                                            "train.checkpoint_period=1", "train.keep_checkpoints=30",
                                            "train.max_bad_steps=3"]))
    assert result.returncode == 3, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: step "), result.stderr[-3000:]
    named = re.search(r"the last checkpoint, with finite weights, is (\S+) ", lines[0])
    assert named, lines[0]
    named = Path(named.group(1))
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert checkpoints and named == checkpoints[-1]
    # The run was stopped 3 steps after its first non-finite step; that step and the later ones
    # were skipped and logged as such, and no checkpoint holds a non-finite number.
    records = loss_records(out)
    assert records[-1]["skipped_steps"] >= 2 and records[-1]["step"] < 30
    for path in checkpoints:
        tensors = checkpoint_tensors(path)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, (path.name, bad[:5])
    # ... and the named one resumes.
    step = int(named.name.split("_")[1])
    resumed = run(train_command(out, cache, [f"train.resume={named}", "train.lr=1e-5", f"train.max_steps={step + 1}",
                                             "train.checkpoint_period=0"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {named}" in resumed.stdout


def test_truncated_shard_is_skipped_by_resume(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = run(train_command(out, cache, ["train.max_steps=2", "train.checkpoint_period=1"]))
    assert first.returncode == 0, first.stderr[-3000:]
    newest = out / "checkpoints" / "step_00000002"
    shard = next(newest.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    resumed = run(train_command(out, cache, ["train.max_steps=3", "train.checkpoint_period=0"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"checkpoint \S*step_00000002 is damaged \({shard.name} has \d+ bytes, the manifest says \d+\): "
                     "falling back to step_00000001", resumed.stdout), resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000001 (step 1" in resumed.stdout
    # A damaged checkpoint named explicitly is an error (one line), not a silent fallback.
    explicit = run(train_command(out, cache, [f"train.resume={newest}", "train.max_steps=3"]))
    assert explicit.returncode == 2
    assert explicit.stderr.strip().splitlines() == [
        f"error: checkpoint {newest.resolve()} is damaged: {shard.name} has {shard.stat().st_size} bytes, "
        f"the manifest says {json.loads((newest / 'manifest.json').read_text())['files'][shard.name]['size']}"]


def test_diverging_run_under_fsdp_stops_on_every_rank_together(tmp_path):
    """2 processes: every rank skips the same steps (the flag is reduced over ranks) and stops at
    the same step; the message appears once."""
    result = run(train_command(tmp_path / "run", tmp_path / "cache", [
        "train.lr=1e3", "train.warmup_iters=0", "train.max_steps=12", "train.checkpoint_period=0",
        "train.max_bad_steps=2"], nproc=2))
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 1 and re.match(r"error: step \d+: 2 consecutive steps", ours[0]), result.stderr[-3000:]
    assert "exitcode  : 3" in result.stderr and "no checkpoint was written" in ours[0]
    skipped = [line for line in result.stdout.splitlines() if "step skipped" in line]
    assert len(skipped) == 2, skipped  # reported by rank 0 only


@pytest.fixture(scope="module")
def bad_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bad") / "broken.json"
    path.write_text('{"images": [')
    return str(path)


CLI_CASES = {
    "bad key": (["train.lrr=1"], r"error: unknown config key 'train.lrr'.*did you mean 'train.lr'\?"),
    "bad type": (["train.lr=fast"], r"error: override 'train.lr': expected a float, got 'fast'"),
    "bad value": (["train.log_period=0"], r"error: invalid config: train.log_period must be >= 1, got 0"),
    "bad preset": (["--preset", "nope"], r"error: dimaskdino.train: argument --preset: invalid choice: 'nope'"),
    "missing json": (["data.train_json=/no/such.json", "data.val_json=/no/such.json", "data.train_images=.",
                      "data.val_images=."], r"error: data.train_json: no such file: /no/such.json"),
    "malformed json": (["data.train_json={bad}", "data.val_json={bad}", "data.train_images=.", "data.val_images=."],
                       r"error: not valid json \(.*\) in .*broken.json"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_train_cli_error_is_one_line(case, bad_json, tmp_path):
    overrides, expected = CLI_CASES[case]
    overrides = [o.replace("{bad}", bad_json) for o in overrides]
    result = run(train_command(tmp_path / "run", tmp_path / "cache", overrides))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(expected, lines[0]), result.stderr


@pytest.mark.parametrize("case, nproc", [("bad key", 1), ("bad key", 2), ("malformed json", 2)])
def test_train_cli_error_under_torchrun(case, nproc, bad_json, tmp_path):
    """The worker's line appears once, and no traceback of ours: what follows it is torchrun's
    own ChildFailedError report (the launcher's, which a worker cannot suppress)."""
    overrides, expected = CLI_CASES[case]
    overrides = [o.replace("{bad}", bad_json) for o in overrides]
    result = run(train_command(tmp_path / "run", tmp_path / "cache", overrides, nproc=nproc))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 1 and re.match(expected, ours[0]), result.stderr
    assert "dimaskdino/" not in result.stderr.replace("dimaskdino.train", ""), "a traceback of the worker"
    assert "exitcode  : 2" in result.stderr


@pytest.mark.parametrize("module, args", [
    ("dimaskdino.evaluate", ["--bogus"]),
    ("dimaskdino.evaluate", ["--checkpoint", "/no/such/run"]),
    ("dimaskdino.predict", ["--checkpoint", "/no/such/run", "x.jpg"]),
])
def test_evaluate_and_predict_errors_are_one_line(module, args, tmp_path):
    result = run([sys.executable, "-m", module, *args])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_debug_flag_adds_the_traceback(tmp_path):
    env = dict(ENV, DIMASKDINO_DEBUG="1")
    result = subprocess.run([sys.executable, "-m", "dimaskdino.train", "train.lrr=1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_per_step_seeds_are_stable_across_python_versions():
    """Pinned values: the seeds come from blake2b of the packed integers, not Python's hash."""
    from dimaskdino.train import stable_seed

    assert stable_seed(0, 5, 123, 0) == 5323966276695171721
    assert stable_seed(0, 5, 123, 1) == 8260769414116628903
    assert len({stable_seed(0, step, image, 0) for step in range(50) for image in range(50)}) == 2500


def test_log_has_no_duplicate_steps_after_a_resume(tmp_path):
    """A run resumed at step 3 after the killed run had logged steps 1-5: log.jsonl and
    TensorBoard hold each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dimaskdino.train import RunLog

    def log(start, steps):
        run_log = RunLog(tmp_path, True, 10, start)
        for step in steps:
            run_log.step(step, {"step": step, "loss": float(step + 100 * start), "lr": 1.0, "img_per_s": 1.0})
        run_log.event(steps[-1], {"checkpoint": "x"})
        run_log.close()

    log(0, [1, 2, 3, 4, 5])
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # a line cut by the kill
    log(3, [4, 5, 6])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records if "loss" in r][3:] == [304.0, 305.0, 306.0]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4, 5, 6]
    assert [s.value for s in scalars][3:] == [304.0, 305.0, 306.0]


def test_two_runs_sharing_the_synthetic_cache_do_not_collide(tmp_path, monkeypatch):
    """Another run finishes generating while this one is still writing: both end with the same
    complete dataset, and no staging folder is left behind."""
    import dimaskdino.data.synthetic as synthetic
    from dimaskdino.config import apply_overrides, get_preset
    from dimaskdino.dist import DistInfo
    from dimaskdino.train import resolve_dataset

    cfg = apply_overrides(get_preset("demo"), [f"data.cache_dir={tmp_path}", "data.synthetic_size=(64,64)",
                                               "data.synthetic_train=2", "data.synthetic_val=1"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    real = synthetic.make_synthetic_coco
    calls = []

    def racing(root, **kwargs):
        calls.append(root)
        if len(calls) == 1:  # the other run, started at the same moment, completes first
            resolve_dataset(cfg, info)
        return real(root, **kwargs)

    monkeypatch.setattr(synthetic, "make_synthetic_coco", racing)
    resolved = resolve_dataset(cfg, info)
    assert len(calls) == 2 and calls[0] != calls[1]  # each wrote into its own staging folder
    assert json.loads(Path(resolved.data.train_json).read_text())["images"]
    assert [p.name for p in tmp_path.iterdir()] == [Path(resolved.data.train_json).parents[1].name]
