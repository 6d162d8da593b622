"""Checkpoints written by DeepSpeed itself (0.19.8, 2 ranks, ZeRO 0/1/2, fp32
and bf16; tests/data/deepspeed_0.19.8, made by
dev/deepspeed_fixtures/make_checkpoints.py) imported with
zerofuse.checkpoint.import_deepspeed: zerofuse continues training from them
with the losses DeepSpeed itself got, and the result loads pickle-free."""
import contextlib
import io
import json
import os

import pytest
import torch
import torch.distributed as dist

import zerofuse
from dist_harness import run_world
from zerofuse.checkpoint import CheckpointError, import_deepspeed, to_fp32_state_dict

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "deepspeed_0.19.8")
with open(os.path.join(DATA, "expected_losses.json")) as _f:
    EXPECTED = json.load(_f)["losses_after_resume"]
CASES = {"zero0_fp32": (0, "fp32"), "zero0_bf16": (0, "bf16"), "zero1_fp32": (1, "fp32"), "zero2_bf16": (2, "bf16")}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))


def batch(step, rank):
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 5, generator=g)[2 * rank:2 * rank + 2], torch.randn(4, 3, generator=g)[2 * rank:2 * rank + 2]


def config(stage, dtype):
    # The script that wrote the checkpoints used these settings.
    return {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 4,
                                                         "warmup_type": "linear"}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"}}


def _continue(rank, world, imported):
    out = {}
    for name, (stage, dtype) in CASES.items():
        with contextlib.redirect_stdout(io.StringIO()):
            engine, *_ = zerofuse.initialize(model=torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(),
                                                                       torch.nn.Linear(7, 3)),
                                             config=config(stage, dtype))
        _, client = engine.load_checkpoint(imported[name])
        assert client == {"epoch": 5, "note": "from DeepSpeed"} and engine.global_steps == 3
        losses = []
        for step in range(3, 5):
            x, y = batch(step, rank)
            loss = torch.nn.functional.mse_loss(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
        out[name] = losses
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    return {name: os.path.dirname(import_deepspeed(os.path.join(DATA, name), str(out / name), trust_pickle=True))
            for name in CASES}


def test_training_continues_as_deepspeed_did(imported):
    losses = run_world(2, _continue, imported)
    for name, (stage, dtype) in CASES.items():
        tol = 1e-5 if dtype == "fp32" else 2e-2  # bf16: DeepSpeed's and zerofuse's rounding of the model differ
        assert losses[name] == pytest.approx(EXPECTED[name], rel=tol), name


def test_the_import_is_pickle_free_and_consolidates(imported):
    for name in CASES:
        for root, _, files in os.walk(imported[name]):
            for f in files:
                if f.endswith(".pt"):
                    torch.load(os.path.join(root, f), weights_only=True)
        state = to_fp32_state_dict(imported[name])
        plain = model()
        plain.load_state_dict(state)  # keys and shapes of the plain model
        assert all(v.dtype == torch.float32 for v in state.values())


def test_import_needs_trust_and_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="pass trust_pickle=True"):
        import_deepspeed(os.path.join(DATA, "zero1_fp32"), str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        import_deepspeed(str(tmp_path), str(tmp_path / "x"), trust_pickle=True)
