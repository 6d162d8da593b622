"""Engine behaviour beyond the reference comparison: gradient accumulation,
fp16 overflow handling, param groups, memory accounting, torchrun."""
import contextlib
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import zerofuse
from dist_harness import free_port, gather_master, run_world
from tiny_gpt import TinyGPT, batch


def make_engine(config, model=None, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        engine, opt, loader, sched = zerofuse.initialize(model=model or TinyGPT(), config=config, **kwargs)
    return engine


def base_config(**overrides):
    config = {"steps_per_print": 1000, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
              "gradient_clipping": 1.0}
    config.update(overrides)
    return config


def train(engine, steps, rows_per_micro, rank=0, world=1, start=0):
    gas = engine.gradient_accumulation_steps()
    losses = []
    for step in range(start, start + steps):
        tokens, targets = batch(step, rows_per_micro * gas * world)
        total = 0.0
        for micro in range(gas):
            first = (micro * world + rank) * rows_per_micro
            loss = engine(tokens[first:first + rows_per_micro], targets[first:first + rows_per_micro])
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / gas)
    return losses


def _accumulation(rank, world):
    out = {}
    for stage in (0, 2):
        big = make_engine(base_config(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1,
                                      zero_optimization={"stage": stage}))
        small = make_engine(base_config(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4,
                                        zero_optimization={"stage": stage, "reduce_bucket_size": 500}))
        train(big, 3, 8, rank, world)
        train(small, 3, 2, rank, world)
        out[stage] = (gather_master(big), gather_master(small))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_four_micro_steps_equal_one_step_of_four_times_the_batch(world):
    out = run_world(world, _accumulation) if world > 1 else _accumulation(0, 1)
    for stage, (big, small) in out.items():
        for name in big:
            # Summation order differs; Adam turns that into ~1e-5 for near-zero gradients.
            torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-5)


def _overflow(rank, world, stage):
    config = base_config(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                         fp16={"enabled": True, "initial_scale_power": 10, "hysteresis": 1},
                         zero_optimization={"stage": stage, "reduce_bucket_size": 600})
    engine = make_engine(config)
    train(engine, 2, 2, rank, world)
    before_master = gather_master(engine)
    before_state = [t.clone() for t in engine.optimizer.rule.state_tensors().values()]
    before_params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    scale, steps = engine.loss_scale(), engine.applied_steps
    # Rank 1 (only) gets an inf in one gradient.
    target = engine.module.blocks[0].fc.weight
    handle = target.register_hook(lambda g: g * float("inf")) if rank == 1 else None
    train(engine, 1, 2, rank, world, start=2)
    if handle:
        handle.remove()
    result = {
        "skipped": engine.was_step_skipped(), "scale_before": scale, "scale_after": engine.loss_scale(),
        "steps_before": steps, "steps_after": engine.applied_steps, "skipped_steps": engine.skipped_steps,
        "global_steps": engine.global_steps,
        "master_same": all(torch.equal(a, b) for a, b in zip(before_master.values(), gather_master(engine).values())),
        "state_same": all(torch.equal(a, b) for a, b in zip(before_state,
                                                            engine.optimizer.rule.state_tensors().values())),
        "params_same": all(torch.equal(p.detach(), before_params[n]) for n, p in engine.module.named_parameters()),
    }
    flags = [None] * world
    dist.all_gather_object(flags, result)
    train(engine, 1, 2, rank, world, start=3)  # and training goes on
    result["every_rank"] = flags
    result["steps_final"] = engine.applied_steps
    return result


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_inf_on_one_rank_skips_the_step_everywhere(stage):
    r = run_world(2, _overflow, stage)
    for flags in r["every_rank"]:
        assert flags["skipped"] and flags["master_same"] and flags["state_same"] and flags["params_same"]
        assert flags["scale_after"] == flags["scale_before"] / 2
        assert flags["steps_after"] == flags["steps_before"] == 2 and flags["skipped_steps"] == 1
        assert flags["global_steps"] == 3  # DeepSpeed's meaning: every boundary, the skipped one too
    assert r["steps_final"] == 3


def test_param_groups_and_a_torch_optimizer_are_honoured():
    """No weight decay on biases and LayerNorm, as GPT recipes do, given as a
    torch.optim.AdamW the engine takes its groups from; against plain torch."""
    def groups(model):
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in model.named_parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]

    model, ref = TinyGPT(), TinyGPT()
    user_opt = torch.optim.AdamW(groups(model), lr=1e-2)
    engine = make_engine({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000}, model=model,
                         optimizer=user_opt, lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 1, 0.5)
    for step in range(3):
        tokens, targets = batch(step, 4)
        loss = engine(tokens, targets)
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        ref(tokens, targets).backward()
        ref_opt.step()
        ref_sched.step()
    assert engine.get_lr() == pytest.approx([g["lr"] for g in ref_opt.param_groups])
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_zerofuse_device_environment_variable(monkeypatch):
    from zerofuse.runtime.distributed import local_device

    monkeypatch.setenv("ZEROFUSE_DEVICE", "cpu")
    assert local_device() == torch.device("cpu")
    monkeypatch.setenv("ZEROFUSE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="ZEROFUSE_DEVICE='tpu' must be 'cpu' or 'cuda'"):
        local_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("ZEROFUSE_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            local_device()
        monkeypatch.delenv("ZEROFUSE_DEVICE")
        assert local_device() == torch.device("cpu")


def _subgroup_and_comm_dtype(rank, world):
    """Data parallel inside a larger layout (a process_group given), and bf16
    gradients reduced in fp32 (communication_data_type)."""
    group = dist.new_group(list(range(world)))
    cfg = base_config(train_micro_batch_size_per_gpu=2, bf16={"enabled": True}, communication_data_type="fp32",
                      zero_optimization={"stage": 2, "reduce_bucket_size": 700})
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=TinyGPT(), config=cfg, process_group=group)
    assert engine.optimizer.reducer.comm_dtype == torch.float32 and engine.placement.group is group
    cfg.pop("communication_data_type")
    plain = make_engine(cfg)
    losses = [train(e, 3, 2, rank, world) for e in (engine, plain)]
    return losses, gather_master(engine), gather_master(plain)


def test_process_group_and_fp32_communication_of_bf16_gradients():
    (ours, plain), master, plain_master = run_world(2, _subgroup_and_comm_dtype)
    assert ours == pytest.approx(plain, rel=2e-2)
    moved = torch.cat([(master[n] - plain_master[n]).flatten() for n in master])
    assert moved.abs().max() < 2e-2  # the same training, up to bf16 rounding of the reduction


def _memory(rank, world, stage):
    engine = make_engine({"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000, "bf16": {"enabled": True},
                          "zero_optimization": {"stage": stage, "reduce_bucket_size": 1024}})
    train(engine, 1, 2, rank, world)
    layout = engine.optimizer.layout
    return engine.memory_report(), layout.shard_size, len(layout.slots), len(layout.buckets), layout.plan.alignment


@pytest.mark.parametrize("stage", [1, 2])
def test_memory_report_matches_the_zero_formula(stage):
    world = 4
    report, shard, n_params, n_buckets, align = run_world(world, _memory, stage)
    psi = sum(p.numel() for p in TinyGPT().parameters())
    padding = (n_params + n_buckets) * align  # at most one alignment per parameter and per bucket chunk
    # Optimizer part: fp32 master + two fp32 moments = 12 bytes per owned element.
    assert report["master_params"] + report["optimizer_state"] == 12 * shard
    assert psi / world <= shard <= psi / world + padding
    assert report["params"] == 2 * shard * world  # the full bf16 model
    if stage == 2:
        # The gradient shard plus one bf16 staging bucket of 1024 elements (reductions
        # without overlap_comm finish before the next bucket opens).
        assert report["grads"] == 2 * shard + 2 * 1024
    else:
        assert report["grads"] == 2 * shard * world


def test_torchrun_two_processes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, zerofuse
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from tiny_gpt import TinyGPT, batch
        engine, *_ = zerofuse.initialize(model=TinyGPT(), config={{
            "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1,
            "zero_optimization": {{"stage": 2}}}})
        rank = torch.distributed.get_rank()
        for step in range(3):
            tokens, targets = batch(step, 8)
            for micro in range(engine.gradient_accumulation_steps()):
                first = (micro * 2 + rank) * 2
                loss = engine(tokens[first:first + 2], targets[first:first + 2])
                engine.backward(loss)
                engine.step()
        # Each rank reports in its own file: two processes' stdout may interleave.
        with open({str(tmp_path)!r} + f"/rank{{rank}}.txt", "w") as f:
            f.write(f"steps {{engine.global_steps}} gas {{engine.gradient_accumulation_steps()}}")
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", ZEROFUSE_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "steps 3 gas 2"
    # Rank 0 alone prints the config and the periodic report.
    assert out.stdout.count("[zerofuse] resolved config") == 1
    assert out.stdout.count("[zerofuse] step=3") == 1


class _Branchy(torch.nn.Module):
    """A second layer that takes part only while use_second is set."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(6, 5), torch.nn.Linear(5, 5)
        self.use_second = True

    def forward(self, x):
        h = self.first(x)
        return ((self.second(h) if self.use_second else h) ** 2).mean()


@pytest.mark.parametrize("stage", [0, 2])
def test_one_process_parameter_unused_for_a_window_gets_a_zero_gradient(stage):
    # At world size 1 gradients go straight into the flat buffer or shard;
    # a parameter with no gradient in a window must see zero there (momentum
    # and weight decay still move it), not the previous window's gradient.
    torch.manual_seed(0)
    model = _Branchy()
    reference = _Branchy()
    reference.load_state_dict(model.state_dict())
    engine = make_engine(base_config(train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=2,
                                     zero_optimization={"stage": stage}), model=model)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.randn(3, 2, 3, 6, generator=torch.Generator().manual_seed(1))
    for window, use_second in enumerate([True, False, False]):
        model.use_second = reference.use_second = use_second
        opt.zero_grad(set_to_none=False)  # the unused layer's gradient is zero, as in the engine
        for micro in range(2):
            engine.backward(engine(data[window, micro]))
            engine.step()
            (reference(data[window, micro]) / 2).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=0, atol=1e-6, msg=name)
