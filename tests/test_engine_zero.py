"""The engine against a single-process torch.optim.AdamW reference with the
same global batch: world sizes 1, 2 and 4, ZeRO stages 0, 1 and 2, fp32 and
bf16, on a GPT whose parameter sizes divide nothing evenly."""
import contextlib
import io

import pytest
import torch

import zerofuse
from dist_harness import gather_master, run_world, train_global_batches
from tiny_gpt import TinyGPT, batch

STEPS, MICRO, ACCUM = 4, 2, 2
LR, WD, CLIP = 1e-2, 0.1, 1.0
CASES = [  # (stage, dtype, extra zero_optimization settings)
    (0, "fp32", {}),
    (1, "fp32", {}),
    (2, "fp32", {"overlap_comm": True}),
    (0, "bf16", {}),
    (1, "bf16", {"reduce_scatter": False}),
    (2, "bf16", {"overlap_comm": True}),
    (2, "fp16", {}),  # a static loss scale: SUM with the sqrt(world) division before and after
]


def engine_config(stage, dtype, extra):
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "steps_per_print": 1000,
        "gradient_clipping": CLIP, "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 256},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.99]}},
        # Small buckets: many of them, and parameters that span several.
        "zero_optimization": dict({"stage": stage, "reduce_bucket_size": 700}, **extra),
    }


def micro_batch(step, micro, rank, world):
    tokens, targets = batch(step, MICRO * ACCUM * world)
    first = (micro * world + rank) * MICRO
    return tokens[first:first + MICRO], targets[first:first + MICRO]


def train_all_cases(rank, world):
    results = {}
    for stage, dtype, extra in CASES:
        with contextlib.redirect_stdout(io.StringIO()):
            engine, *_ = zerofuse.initialize(model=TinyGPT(), config=engine_config(stage, dtype, extra))
        losses = train_global_batches(engine, rank, world, batch, STEPS, MICRO, ACCUM)
        assert engine.global_steps == STEPS
        results[(stage, dtype)] = (losses, gather_master(engine), engine.memory_report())
    return results


def reference(dtype, world):
    """torch.optim.AdamW on fp32 master weights over the whole global batch;
    for bf16 the model computes in bf16 from the rounded master, as the engine."""
    master = TinyGPT()
    model = TinyGPT().to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    opt = torch.optim.AdamW(master.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.99))
    initial = {n: p.detach().clone() for n, p in master.named_parameters()}
    losses = []
    for step in range(STEPS):
        with torch.no_grad():
            for p, q in zip(model.parameters(), master.parameters()):
                p.copy_(q)
        model.zero_grad()
        loss = model(*batch(step, MICRO * ACCUM * world))
        loss.backward()
        for p, q in zip(model.parameters(), master.parameters()):
            q.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(master.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in master.named_parameters()}, initial


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_single_process_adamw(world):
    results = run_world(world, train_all_cases) if world > 1 else train_all_cases(0, 1)
    refs = {dtype: reference(dtype, world) for dtype in ("fp32", "bf16", "fp16")}
    for (stage, dtype), (losses, master, _) in results.items():
        ref_losses, ref_master, initial = refs[dtype]
        # fp32: the same arithmetic up to summation order; bf16: gradients are
        # computed per micro-batch in bf16 and averaged, the reference in one batch.
        loss_tol, delta_tol = {"fp32": (1e-5, 2e-5), "bf16": (2e-2, 6e-2), "fp16": (5e-3, 2e-2)}[dtype]
        assert losses == pytest.approx(ref_losses, rel=loss_tol), f"stage {stage} {dtype}: losses"
        moved = torch.cat([(master[n] - initial[n]).flatten() for n in ref_master])
        ref_moved = torch.cat([(ref_master[n] - initial[n]).flatten() for n in ref_master])
        err = ((moved - ref_moved).norm() / ref_moved.norm()).item()
        assert err < delta_tol, f"stage {stage} {dtype} world {world}: parameter updates differ by {err:.2e}"
