"""The engine's components save and load themselves (torch.distributed.checkpoint's
Stateful shape): step control, optimizer, training progress, the metrics log."""
import contextlib
import csv
import io
import os

import pytest
import torch

import zerofuse
from zerofuse import _C
from zerofuse.runtime.progress import TrainingProgress
from zerofuse.runtime.step_control import StepControl, StepControlSettings

from tiny_gpt import TinyGPT, batch


def test_step_entries_are_named_once_by_the_core():
    for fields, size in ((_C.STEP_STATE_FIELDS, _C.STEP_STATE_SIZE), (_C.STEP_OUTPUT_FIELDS, _C.STEP_OUTPUT_SIZE)):
        assert sorted(fields.values()) == list(range(size))


def _overflowing_steps(control, n):
    """n decisions on gradients holding an inf, then one clean one."""
    for i in range(n + 1):
        grad = torch.full((5,), float("inf") if i < n else 0.5)
        control.decide([grad])
        control.publish()


def test_step_control_round_trips_through_its_state_dict():
    settings = StepControlSettings(dynamic_loss_scale=True, initial_scale_power=10, hysteresis=2,
                                   loss_scale_window=3, max_grad_norm=1.0)
    a = StepControl(settings, torch.device("cpu"))
    _overflowing_steps(a, 3)
    saved = a.state_dict()
    assert saved["skipped_steps"] == 3 and saved["applied_steps"] == 1 and saved["cur_scale"] == 2.0 ** 8
    b = StepControl(settings, torch.device("cpu"))
    b.load_state_dict(saved)
    assert b.state_dict() == saved and b.loss_scale == a.loss_scale
    # Both go on to the same decisions.
    _overflowing_steps(a, 1)
    _overflowing_steps(b, 1)
    assert b.state_dict() == a.state_dict()
    assert b.last_grad_norm == pytest.approx(a.last_grad_norm)


def test_step_control_refuses_a_bad_state():
    control = StepControl(StepControlSettings(), torch.device("cpu"))
    state = control.state_dict()
    with pytest.raises(ValueError, match="loss scale -1.0 is not a positive number"):
        control.load_state_dict(dict(state, cur_scale=-1.0))
    with pytest.raises(ValueError, match="lacks \\['applied_steps'\\]"):
        control.load_state_dict({k: v for k, v in state.items() if k != "applied_steps"})
    assert control.state_dict() == state  # unchanged by the refused loads


def test_training_progress_round_trip_starts_a_fresh_window():
    p = TrainingProgress()
    boundaries = [p.count_micro_step(3) for _ in range(7)]
    assert boundaries == [False, False, True, False, False, True, False]
    assert p.micro_steps(3) == 7 and p.optimizer_steps == 2
    q = TrainingProgress()
    q.load_state_dict(p.state_dict())
    assert q.optimizer_steps == 2 and q.micro_steps_in_window == 0 and q.micro_steps(4) == 8
    with pytest.raises(ValueError, match="'scheduler_steps' must be an int >= 0"):
        q.load_state_dict(dict(p.state_dict(), scheduler_steps=-1))


def _engine(seed, config):
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=TinyGPT(seed), config=config)
    return engine


CONFIG = {"train_micro_batch_size_per_gpu": 3, "steps_per_print": 10**6, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 1, "reduce_bucket_size": 500},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}}}


def _train(engine, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        tokens, targets = batch(step, 3)
        loss = engine(tokens, targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_optimizer_state_dict_continues_training_exactly():
    a = _engine(0, CONFIG)
    _train(a, 3)
    state = a.optimizer.state_dict()
    assert state["param_names"] == [n for n, _ in a.optimizer.named_trainable_parameters()]
    assert state["master"].dtype == torch.float32 and state["slices"].shape[1] == 3
    b = _engine(7, CONFIG)  # other weights: everything must come from the state
    b.optimizer.load_state_dict(state)
    for (name, p), (_, q) in zip(a.optimizer.named_trainable_parameters(), b.optimizer.named_trainable_parameters()):
        assert torch.equal(p, q), name
    assert _train(b, 3, 3) == _train(a, 3, 3)


def test_optimizer_load_state_dict_names_a_wrong_size():
    engine = _engine(0, CONFIG)
    state = engine.optimizer.state_dict()
    with pytest.raises(ValueError, match="'exp_avg' must hold"):
        engine.optimizer.load_state_dict(dict(state, exp_avg=state["exp_avg"][:-1]))


def test_csv_monitor_keeps_the_rows_up_to_a_resumed_checkpoint(tmp_path):
    config = dict(CONFIG, csv_monitor={"enabled": True, "output_path": str(tmp_path / "logs"), "job_name": "job"})
    engine = _engine(0, config)
    _train(engine, 2)
    with contextlib.redirect_stdout(io.StringIO()):
        engine.save_checkpoint(str(tmp_path / "ckpt"))
    _train(engine, 2, 2)  # two more rows, lost with the run
    resumed = _engine(0, config)
    with contextlib.redirect_stdout(io.StringIO()):
        resumed.load_checkpoint(str(tmp_path / "ckpt"))
    _train(resumed, 1, 2)
    with open(os.path.join(tmp_path, "logs", "job", "metrics.csv")) as f:
        samples = [int(r["samples"]) for r in csv.DictReader(f)]
    assert samples == [3, 6, 9]  # rows of steps 1-2 kept, step 3 written once
