"""Checkpoints: resume at another world size and ZeRO stage, consolidation to
a plain fp32 state_dict, interrupted saves, and damaged files."""
import contextlib
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zerofuse
from dist_harness import gather_master, run_world, train_global_batches
from tiny_gpt import TinyGPT, batch
from zerofuse.checkpoint import CheckpointError, read_manifest, to_fp32_state_dict

GLOBAL_ROWS, MICRO = 8, 2


def config(world, stage):
    return {"train_batch_size": GLOBAL_ROWS, "train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 1000,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage, "reduce_bucket_size": 900},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 5,
                                                         "warmup_type": "linear"}}}


def engine_for(world, stage, seed=0):
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=TinyGPT(seed), config=config(world, stage))
    return engine


def train(engine, rank, world, steps, start):
    return train_global_batches(engine, rank, world, batch, steps, MICRO, engine.gradient_accumulation_steps(),
                                first_step=start)


def _train_save_continue(rank, world, save_dir):
    engine = engine_for(world, stage=2)
    train(engine, rank, world, 3, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        engine.save_checkpoint(save_dir, client_state={"epoch": 7})
    at_save = gather_master(engine)
    return at_save, train(engine, rank, world, 3, 3), engine.get_lr()


def _resume(rank, world, save_dir, stage):
    engine = engine_for(world, stage, seed=123)  # different initial weights: all must come from the checkpoint
    path, client = engine.load_checkpoint(save_dir)
    steps = engine.global_steps
    return train(engine, rank, world, 3, 3), steps, client, engine.get_lr()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("ckpt"))
    at_save, losses, lr = run_world(2, _train_save_continue, save_dir)
    return save_dir, at_save, losses, lr


@pytest.mark.parametrize("world,stage", [(1, 0), (4, 1), (2, 2)])
def test_resume_at_another_world_size_and_stage(saved, world, stage):
    save_dir, _, expected, expected_lr = saved
    losses, steps, client, lr = run_world(world, _resume, save_dir, stage) if world > 1 else _resume(0, 1, save_dir, stage)
    assert steps == 3 and client == {"epoch": 7}
    assert losses == pytest.approx(expected, rel=1e-5)
    assert lr == pytest.approx(expected_lr)


def test_manifest_and_files(saved):
    save_dir, *_ = saved
    path, manifest = read_manifest(save_dir)
    assert os.path.basename(path) == "global_step3" and open(os.path.join(save_dir, "latest")).read() == "global_step3"
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2 and manifest["global_steps"] == 3
    assert manifest["scheduler"] == {"last_batch_iteration": 2}
    assert sorted(f for f in os.listdir(path)) == sorted(
        ["manifest.json", "model_states.pt", "zero_shard_00000.pt", "zero_shard_00001.pt", "rng_00000.pt",
         "rng_00001.pt"])
    for name in os.listdir(path):  # no pickled objects anywhere
        if name.endswith(".pt"):
            torch.load(os.path.join(path, name), weights_only=True)


def test_consolidated_fp32_state_dict_loads_into_the_plain_model(saved):
    save_dir, at_save, *_ = saved
    state = to_fp32_state_dict(save_dir)
    model = TinyGPT(seed=99)
    model.load_state_dict(state)  # strict: every key, tied weights included
    assert state["head.weight"] is state["wte.weight"]
    for name, value in at_save.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), value)


CRASHING_SAVE = textwrap.dedent("""
    import contextlib, io, os, sys, torch, zerofuse
    sys.path.insert(0, {tests!r})
    from tiny_gpt import TinyGPT, batch
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=TinyGPT(), config={{"train_micro_batch_size_per_gpu": 2,
                                                                   "steps_per_print": 1000}})
    def step(i):
        loss = engine(*batch(i, 2)); engine.backward(loss); engine.step()
    step(0)
    engine.save_checkpoint({save_dir!r}, tag="good")
    step(1)
    where = {where!r}
    if where == "writing":      # killed while the shard files are being written
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            os._exit(3)
        torch.save = dying_save
        engine.save_checkpoint({save_dir!r}, tag="bad")
    else:                        # re-saving "good": killed after the old one was moved aside
        real_replace = os.replace
        def dying_replace(src, dst):
            real_replace(src, dst)
            if dst.endswith(".good.old"):
                os._exit(3)
        os.replace = dying_replace
        engine.save_checkpoint({save_dir!r}, tag="good")
""")


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_a_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path, where):
    save_dir = str(tmp_path)
    script = CRASHING_SAVE.format(tests=os.path.dirname(os.path.abspath(__file__)), save_dir=save_dir, where=where)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert open(os.path.join(save_dir, "latest")).read() == "good"
    assert not os.path.exists(os.path.join(save_dir, "bad"))
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=TinyGPT(5), config={"train_micro_batch_size_per_gpu": 2})
    engine.load_checkpoint(save_dir)
    assert engine.global_steps == 1


def test_damaged_and_mismatched_checkpoints_are_clear_errors(saved, tmp_path):
    save_dir, *_ = saved
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(save_dir, broken)
    shard = broken / "global_step3" / "zero_shard_00001.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    engine = engine_for(1, 0)
    with pytest.raises(CheckpointError, match="zero_shard_00001.pt cannot be read"):
        engine.load_checkpoint(str(broken))
    shard.unlink()
    with pytest.raises(CheckpointError, match="zero_shard_00001.pt is missing"):
        engine.load_checkpoint(str(broken))
    # No checkpoint at all: DeepSpeed's (None, None) and a warning, not an error.
    with pytest.warns(UserWarning, match="holds no checkpoint"):
        assert engine.load_checkpoint(str(tmp_path / "nothing")) == (None, None)
    with pytest.warns(UserWarning, match="holds no checkpoint tagged 'nope'"):
        assert engine.load_checkpoint(save_dir, tag="nope") == (None, None)

    class Wider(TinyGPT):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(3, 3)

    with contextlib.redirect_stdout(io.StringIO()):
        other, *_ = zerofuse.initialize(model=Wider(), config=config(1, 0))
    with pytest.raises(CheckpointError, match="does not fit the model: missing .'extra.weight'"):
        other.load_checkpoint(save_dir)


def test_loss_scaler_state_round_trips(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
           "fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 3}}
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=TinyGPT(), config=cfg)
    handle = engine.module.ln_f.weight.register_hook(lambda g: g * float("inf"))
    loss = engine(*batch(0, 2)); engine.backward(loss); engine.step()
    handle.remove()
    for i in range(1, 3):
        loss = engine(*batch(i, 2)); engine.backward(loss); engine.step()
    assert engine.loss_scale() == 128 and engine.applied_steps == 2 and engine.skipped_steps == 1
    assert engine.global_steps == 3
    with contextlib.redirect_stdout(io.StringIO()):
        engine.save_checkpoint(str(tmp_path))
        resumed, *_ = zerofuse.initialize(model=TinyGPT(), config=cfg)
    resumed.load_checkpoint(str(tmp_path))
    assert (resumed.loss_scale(), resumed.applied_steps, resumed.skipped_steps, resumed.global_steps) == (128, 2, 1, 3)
    # Two more clean steps: the window (3) counts the steps before the save too.
    for engine_ in (engine, resumed):
        for i in range(3, 5):
            loss = engine_(*batch(i, 2)); engine_.backward(loss); engine_.step()
    assert resumed.loss_scale() == engine.loss_scale()
