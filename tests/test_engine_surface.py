"""The engine's DeepSpeed surface: a torch.nn.Module wrapping the model,
DeepSpeed's getters, train_batch, no_sync, manual accumulation boundaries,
torch_autocast, the data loader, client_state and 16-bit model saves."""
import contextlib
import io
import os

import numpy as np
import pytest
import torch

import zerofuse
from dist_harness import run_world
from tiny_gpt import TinyGPT, batch

BASE = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}


def make(config=None, model=None, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model or TinyGPT(), config=dict(BASE, **(config or {})), **kwargs)
    return engine


def test_the_engine_is_a_module_around_the_model():
    model = TinyGPT()
    model.vocabulary_name = "tiny"
    engine = make(model=model)
    assert isinstance(engine, torch.nn.Module) and engine.module is model
    assert set(engine.state_dict()) == {"module." + k for k in model.state_dict()}
    assert set(engine.module_state_dict()) == set(model.state_dict())
    assert engine.vocabulary_name == "tiny"  # not the engine's: looked up on the model
    assert engine.blocks is model.blocks
    with pytest.raises(AttributeError, match="its model have no attribute 'nonexistent'"):
        engine.nonexistent
    engine.eval()
    assert not model.training
    engine.train()
    assert model.training
    assert [p for p in engine.parameters()] == [p for p in model.parameters()]


def test_deepspeed_getters():
    engine = make({"gradient_accumulation_steps": 3, "bf16": {"enabled": True}, "gradient_clipping": 0.5,
                   "zero_optimization": {"stage": 1}})
    assert engine.gradient_accumulation_steps() == 3 and engine.train_batch_size() == 6
    assert engine.train_micro_batch_size_per_gpu() == 2 and engine.gradient_clipping() == 0.5
    assert engine.bfloat16_enabled() and not engine.fp16_enabled() and engine.zero_optimization_stage() == 1
    assert engine.loss_scale() == 1.0 and engine.optimizer_name() == "AdamW"
    assert engine.global_rank == 0 and engine.local_rank == 0 and engine.world_size == 1
    assert engine.communication_data_type == torch.bfloat16


def test_train_batch_equals_the_hand_written_loop():
    data = [batch(i, 2) for i in range(6)]
    a, b = make({"gradient_accumulation_steps": 3}), make({"gradient_accumulation_steps": 3})
    losses = [a.train_batch(iter(data[i:i + 3])).item() for i in (0, 3)]
    expected = []
    for i in (0, 3):
        total = 0.0
        for tokens, targets in data[i:i + 3]:
            loss = b(tokens, targets)
            b.backward(loss)
            b.step()
            total += loss.item()
        expected.append(total / 3)
    assert losses == pytest.approx(expected, rel=1e-6)
    assert a.global_steps == b.global_steps == 2
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_manual_boundaries_and_unscaled_backward():
    # With the boundary set by hand (as a pipeline does), three micro-batches
    # accumulate into one step; scale_wrt_gas=False leaves the loss undivided.
    a = make({"gradient_accumulation_steps": 1})
    b = make({"gradient_accumulation_steps": 3})
    for i in range(3):
        a.set_gradient_accumulation_boundary(i == 2)
        loss = a(*batch(i, 2)) / 3
        a.backward(loss, scale_wrt_gas=False)
        a.step()
        loss = b(*batch(i, 2))
        b.backward(loss)
        b.step()
    assert a.global_steps == b.global_steps == 1
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _no_sync(rank, world, stage):
    engine = make({"gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage}})
    plain = make({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": stage}})
    for i in range(2):
        tokens, targets = batch(i, 2 * world)
        rows = slice(2 * rank, 2 * rank + 2)
        if i == 0:
            with engine.no_sync():
                engine.backward(engine(tokens[rows], targets[rows]) / 2, scale_wrt_gas=False)
                with pytest.raises(RuntimeError, match="cannot be called inside engine.no_sync"):
                    engine.step()
        else:
            engine.backward(engine(tokens[rows], targets[rows]) / 2, scale_wrt_gas=False)
            engine.step()
        plain.backward(plain(tokens[rows], targets[rows]))
        plain.step()
    return [p.detach().clone() for p in engine.parameters()], [p.detach().clone() for p in plain.parameters()]


def test_no_sync_accumulates_locally_then_reduces_once():
    got, expected = run_world(2, _no_sync, 1)
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="incompatible with gradient partitioning"):
        with make({"zero_optimization": {"stage": 2}}).no_sync():
            pass


def test_torch_autocast_runs_forward_in_bfloat16_with_float32_parameters():
    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = self.linear(x)
            self.seen = y.dtype
            return y.float().pow(2).mean()

    engine = make({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, model=Probe())
    loss = engine(torch.randn(2, 8))
    assert engine.module.seen == torch.bfloat16 and engine.module.linear.weight.dtype == torch.float32
    engine.backward(loss)
    engine.step()


def test_training_data_gets_deepspeeds_sampling():
    data = torch.utils.data.TensorDataset(torch.arange(11))
    engine = make({"dataloader_drop_last": True}, training_data=data)
    loader = engine.training_dataloader
    assert len(loader) == 5  # 11 samples, batches of 2, the last one dropped
    first = torch.cat([b[0] for b in loader])
    expected = list(torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(0)))
    assert first.tolist() == expected[:10]
    second = torch.cat([b[0] for b in loader])
    assert second.tolist() != first.tolist()  # a new epoch reshuffles (DeepSpeed repeats the first order)


def test_client_state_round_trips_without_pickle(tmp_path):
    engine = make()
    engine.backward(engine(*batch(0, 2)))
    engine.step()
    state = {"epoch": 3, "best": float("inf"), "note": None, "ema": torch.randn(4, 3), "ids": np.arange(5),
             "pair": (1, "a"), 7: "int key", "nested": {"names": np.array(["x", "y"]), "scale": np.float32(0.5)}}
    assert engine.save_checkpoint(str(tmp_path), client_state=state) is True
    for root, _, files in os.walk(tmp_path):
        for name in files:
            if name.endswith(".pt"):
                torch.load(os.path.join(root, name), weights_only=True)
    path, loaded = make().load_checkpoint(str(tmp_path))
    assert path.endswith("global_step1")
    assert loaded["epoch"] == 3 and loaded["best"] == float("inf") and loaded["note"] is None
    assert torch.equal(loaded["ema"], state["ema"]) and isinstance(loaded["ids"], np.ndarray)
    assert loaded["ids"].tolist() == [0, 1, 2, 3, 4] and loaded["pair"] == (1, "a") and loaded[7] == "int key"
    assert loaded["nested"]["names"].tolist() == ["x", "y"] and loaded["nested"]["scale"] == np.float32(0.5)
    with pytest.raises(TypeError, match=r"client_state\['bad'\]: object cannot be stored without pickle"):
        engine.save_checkpoint(str(tmp_path / "x"), client_state={"bad": object()})


def test_save_16bit_model(tmp_path):
    engine = make({"bf16": {"enabled": True}})
    assert engine.save_16bit_model(str(tmp_path / "out"), "model.bin") is True
    state = torch.load(tmp_path / "out" / "model.bin", weights_only=True)
    assert set(state) == set(engine.module.state_dict())
    assert state["wte.weight"].dtype == torch.bfloat16
    assert torch.equal(state["wte.weight"], engine.module.wte.weight.detach())


def test_load_module_state_dict_refreshes_the_masters():
    # The loaded values are bf16, so the masters become those values (as they
    # do for a, reloading its own): without the refresh b's masters would keep
    # the weights of its other seed.
    a, b = make({"bf16": {"enabled": True}}), make({"bf16": {"enabled": True}}, model=TinyGPT(5))
    a.load_module_state_dict(a.module_state_dict())
    b.load_module_state_dict(a.module_state_dict())
    for engine in (a, b):
        engine.backward(engine(*batch(0, 2)))
        engine.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_throughput_timer_reports_samples_per_second():
    engine = make()
    for i in range(4):
        engine.backward(engine(*batch(i, 2)))
        engine.step()
    assert engine.tput_timer.global_step_count == 4 and engine.tput_timer.avg_samples_per_sec() > 0
