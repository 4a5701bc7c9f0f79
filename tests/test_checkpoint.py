"""Checkpoint files: manifests verified before loading, fallback to the newest good one, no
non-finite state written, a re-save that keeps the old copy until the new one is in place, DCP
errors as one-line CheckpointErrors; and the non-finite step guard."""

import json
import logging
import os

import pytest
import torch
from torch import nn

from dimaskdino import checkpoint as C
from dimaskdino.checkpoint import (
    CheckpointError,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verification_problem,
)
from dimaskdino.cli import TrainingDiverged
from dimaskdino.step_guard import NonFiniteGuard, optimizer_step, skip_flag


def small_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def trained(model) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return optimizer


def save(directory, step, model=None, **kwargs):
    model = model or small_model()
    return save_checkpoint(directory, step, model, trained(model), {"note": step}, **kwargs)


def shard_of(path):
    return next(path.glob("*.distcp"))


def test_manifest_finds_truncated_and_changed_files(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert ".metadata" in manifest and shard_of(path).name in manifest
    assert verification_problem(path) is None
    shard = shard_of(path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert "CRC-32 mismatch" in verification_problem(path)
    shard.write_bytes(bytes(data[:100]))
    assert verification_problem(path) == f"{shard.name} has 100 bytes, the manifest says {len(data)}"
    shard.unlink()
    assert verification_problem(path) == f"{shard.name} is missing"


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=0)
    for step in (2, 3):
        shard = shard_of(tmp_path / f"step_{step:08d}")
        with open(shard, "r+b") as f:
            f.truncate(10)
    with caplog.at_level(logging.WARNING, logger="dimaskdino.checkpoint"):
        assert find_resumable(tmp_path) == tmp_path / "step_00000001"
    messages = [r.getMessage() for r in caplog.records]
    assert any("step_00000003 is damaged" in m and "falling back to step_00000002" in m for m in messages)
    assert any("step_00000002 is damaged" in m and "falling back to step_00000001" in m for m in messages)
    # A folder of checkpoints resolves to the good one; the damaged one named directly is an error.
    assert resolve_checkpoint(tmp_path) == (tmp_path / "step_00000001").resolve()
    with pytest.raises(CheckpointError, match="step_00000003 is damaged"):
        resolve_checkpoint(tmp_path / "step_00000003")
    shard = shard_of(tmp_path / "step_00000001")
    with open(shard, "r+b") as f:
        f.truncate(10)
    assert find_resumable(tmp_path) is None


def test_non_finite_state_is_never_written(tmp_path, caplog):
    model = small_model()
    optimizer = trained(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="dimaskdino.checkpoint"):
        assert save_checkpoint(tmp_path, 5, model, optimizer, {}) is None
    assert "not finite: checkpoint not written" in caplog.text
    assert list_checkpoints(tmp_path) == [] and not list(tmp_path.glob("*"))
    model = small_model()
    optimizer = trained(model)
    next(iter(optimizer.state.values()))["exp_avg_sq"][0] = float("inf")  # the optimizer state too
    assert save_checkpoint(tmp_path, 5, model, optimizer, {}) is None


def test_resave_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    first = save(tmp_path, 7)
    real_replace = os.replace

    def crash_on_second_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("simulated crash between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 7, small_model(seed=1))
    monkeypatch.undo()
    # The previous copy is still there (as step_00000007.old) and is what resume finds.
    (found,) = list_checkpoints(tmp_path)
    assert found.name == "step_00000007.old" and verification_problem(found) is None
    model = small_model(seed=2)
    load_checkpoint(found, model)
    torch.testing.assert_close(model[0].weight, small_model_after_one_step())
    # A later complete re-save replaces it cleanly.
    save(tmp_path, 7)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000007"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000007"]
    assert first == tmp_path / "step_00000007"


def small_model_after_one_step():
    model = small_model()
    trained(model)
    return model[0].weight.detach()


def test_dcp_errors_are_one_line_checkpoint_errors(tmp_path):
    path = save(tmp_path, 1)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))  # another shape
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, other)
    message = str(error.value)
    assert message.startswith(f"cannot load checkpoint {path.resolve()}") and "\n" not in message


def test_skipped_step_leaves_weights_and_optimizer_state_untouched():
    model = small_model()
    optimizer = trained(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in next(iter(optimizer.state.values())).items()}
    model(torch.randn(4, 8)).sum().backward()
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    skip = skip_flag(torch.tensor(1.0), grad_norm)
    assert skip.item() == 1.0
    optimizer_step(optimizer, skip)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in next(iter(optimizer.state.values())).items():
        assert torch.equal(v, state_before[k]), k  # the step count too: the bias correction is unchanged
    optimizer.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    optimizer_step(optimizer, skip_flag(torch.tensor(1.0), nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
    assert not torch.equal(model[0].weight, before["0.weight"])  # a finite step is applied
    with pytest.raises(ValueError, match="fused"):
        optimizer_step(torch.optim.AdamW(model.parameters()), skip)


def test_guard_counts_and_stops_after_max_bad_steps(tmp_path):
    guard = NonFiniteGuard(max_bad_steps=3, skipped_before=4)
    guard.last_checkpoint = tmp_path / "step_00000010"
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    guard.record(11, torch.tensor(1.0), nan, one)
    guard.record(12, torch.tensor(0.0), one, one)  # a good step resets the streak
    guard.record(13, torch.tensor(1.0), one, torch.tensor(float("inf")))
    guard.record(14, torch.tensor(1.0), nan, nan)
    with pytest.raises(TrainingDiverged) as error:
        guard.record(15, torch.tensor(1.0), nan, nan)
    assert guard.skipped == 4 + 4
    message = str(error.value)
    assert message.startswith("step 15: 3 consecutive steps with a non-finite loss or gradient norm")
    assert f"the last checkpoint, with finite weights, is {tmp_path / 'step_00000010'}" in message
    assert TrainingDiverged.exit_code == 3
