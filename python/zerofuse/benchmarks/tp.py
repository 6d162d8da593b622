"""Tensor parallelism on the CPU: a Hugging Face GPT-2 the size of `zerofuse
train`'s default model split over 2 ranks by AutoTP ("tensor_parallel":
{"autotp_size": 2}), against the same model data parallel over the same 2
processes (ZeRO-1) and in one process, on the same global batches.

Each round runs every configuration in fresh processes, in the same order;
figures are the median step time after warm-up (median and range over
rounds). Also recorded: the bytes one rank sends into collectives per step
(zerofuse's comms log: the tensor-parallel all-reduces of activations and
gradients, and the data-parallel gradient reduction) and the losses, which
must agree.

    python bench/tp.py
    python bench/tp.py --rounds 3 --steps 12
"""
import argparse
import contextlib
import io
import statistics
import time

import torch
import torch.distributed as dist

from .common import run_on_cpu_ranks, write_results

GPT2 = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=128)  # zerofuse train's CPU default
ROWS, SEQ = 16, 128  # the global batch: 16 sequences of 128 tokens


def _model():
    import transformers as tf
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                            bos_token_id=0, eos_token_id=0))


def _config(kind, world):
    dp = 1 if kind != "data_parallel" else world
    cfg = {"train_micro_batch_size_per_gpu": ROWS // dp, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
           "zero_optimization": {"stage": 1}, "comms_logger": {"enabled": True}}
    if kind == "tensor_parallel":
        cfg["tensor_parallel"] = {"autotp_size": world}
    return cfg


def _run(rank, world, kind, steps):
    import zerofuse
    from zerofuse.runtime.comms_log import COMMS_LOG

    g = torch.Generator().manual_seed(1234)
    data = [torch.randint(0, GPT2["vocab_size"], (ROWS, SEQ), generator=g) for _ in range(steps)]
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=_model(), config=_config(kind, world))
    COMMS_LOG.reset()
    dp = world if kind == "data_parallel" else 1
    times, losses = [], []
    for ids in data:
        mine = ids[rank * (ROWS // dp):(rank + 1) * (ROWS // dp)] if dp > 1 else ids
        t0 = time.perf_counter()
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        if dp > 1:
            dist.all_reduce(total)
            total /= dp
        times.append(time.perf_counter() - t0)
        losses.append(total.item())
    per_step = COMMS_LOG.steps[-1] if COMMS_LOG.steps else {}
    return times, losses, sum(per_step.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tp < 2 or args.steps <= args.warmup:
        parser.error("--tp must be >= 2 and --steps greater than --warmup")
    runs = {"tensor_parallel": args.tp, "data_parallel": args.tp, "one_process": 1}
    medians = {k: [] for k in runs}
    details = {}
    for r in range(args.rounds):
        for kind, world in runs.items():
            times, losses, nbytes = run_on_cpu_ranks(world, _run, kind, args.steps)
            medians[kind].append(statistics.median(times[args.warmup:]) * 1e3)
            details[kind] = {"processes": world, "losses": [round(v, 6) for v in losses],
                             "bytes_sent_per_step": nbytes}
            print(f"round {r}: {kind:<16} {medians[kind][-1]:9.2f} ms/step")
    results = {}
    for kind in runs:
        ms = medians[kind]
        results[kind] = dict(details[kind], step_ms_median=round(statistics.median(ms), 2),
                             step_ms_range=[round(min(ms), 2), round(max(ms), 2)])
    base = results["one_process"]["step_ms_median"]
    for kind in ("tensor_parallel", "data_parallel"):
        results[kind]["time_vs_one_process"] = round(results[kind]["step_ms_median"] / base, 3)
        results[kind]["max_loss_difference_vs_one_process"] = max(
            abs(a - b) for a, b in zip(details[kind]["losses"], details["one_process"]["losses"]))
    results["setup"] = {"gpt2": GPT2, "global_batch": [ROWS, SEQ], "tp": args.tp, "steps": args.steps,
                        "warmup": args.warmup, "rounds": args.rounds, "zero_stage": 1}
    path = write_results(f"tp{args.tp}", "cpu", results, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
