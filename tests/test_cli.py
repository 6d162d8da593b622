"""`zerofuse train / sample / to-fp32 / env` end to end on the CPU, with a tiny
model and few steps; bad input gives one line and a non-zero exit."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_harness import free_port

TINY = ["--layers", "1", "--heads", "2", "--width", "16", "--context", "24", "--batch-size", "4",
        "--eval-every", "3", "--eval-batches", "2"]


def zerofuse(*args, env=None, timeout=180):
    e = dict(os.environ, ZEROFUSE_NUM_THREADS="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "zerofuse", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(25):  # enough files for a train/validation split
        (root / f"part{i:02d}.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * (20 + i))
    return str(root)


def read_metrics(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_train_sample_and_consolidate(corpus, tmp_path):
    run = str(tmp_path / "run")
    out = zerofuse("train", "--data", corpus, "--out", run, "--steps", "6", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("config.json", "metrics.csv", "loss.png", os.path.join("checkpoints", "latest")):
        assert os.path.exists(os.path.join(run, name)), name
    with open(os.path.join(run, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(7))  # step 0: the validation loss before training
    assert rows[0]["val_loss"] and rows[3]["val_loss"] and rows[6]["val_loss"] and not rows[2]["val_loss"]
    assert all(float(r["train_loss"]) > 0 for r in rows[1:])
    assert float(rows[6]["val_loss"]) < float(rows[0]["val_loss"])  # it learns, even in 6 steps

    sample = zerofuse("sample", "--run", run, "--prompt", "the ", "--tokens", "30")
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout.startswith("the ") and len(sample.stdout) >= 30

    fp32 = zerofuse("to-fp32", os.path.join(run, "checkpoints"), str(tmp_path / "model.pt"))
    assert fp32.returncode == 0, fp32.stderr
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["wte.weight"].dtype == torch.float32 and state["wte.weight"].shape == (256, 16)


def test_resume_continues_from_the_last_checkpoint(corpus, tmp_path):
    run = str(tmp_path / "run")
    assert zerofuse("train", "--data", corpus, "--out", run, "--steps", "3", *TINY).returncode == 0
    again = zerofuse("train", "--data", corpus, "--out", run, "--steps", "3", *TINY)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    out = zerofuse("train", "--data", corpus, "--out", run, "--steps", "6", "--resume", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(run)] == list(range(7))

    # The same six steps in one go give the same losses.
    whole = str(tmp_path / "whole")
    assert zerofuse("train", "--data", corpus, "--out", whole, "--steps", "6", *TINY).returncode == 0
    resumed = [r["train_loss"] for r in read_metrics(run)][4:]
    straight = [r["train_loss"] for r in read_metrics(whole)][4:]
    assert [float(x) for x in resumed] == pytest.approx([float(x) for x in straight], rel=1e-4)


def test_default_corpus_is_the_standard_library(tmp_path):
    run = str(tmp_path / "run")
    out = zerofuse("train", "--out", run, "--steps", "2", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Python standard library" in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "/nonexistent/path"], "--data /nonexistent/path does not exist"),
        (["train", "--config", "/nonexistent/ds.json"], "config file '/nonexistent/ds.json' does not exist"),
        (["train", "--width", "10", "--heads", "3"], "--width (10) must be divisible by --heads (3)"),
        (["sample", "--run", "/nonexistent"], "is not a zerofuse train run directory"),
        (["to-fp32", "/nonexistent", "x.pt"], "no 'latest' file"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(args, message, tmp_path):
    out = zerofuse(*args, "--out", str(tmp_path / "r")) if args[0] == "train" else zerofuse(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_empty_directory_and_invalid_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = zerofuse("train", "--data", str(empty), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "contains no text files" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": 4, "zero_optimisation": {"stage": 2}}')
    out = zerofuse("train", "--config", str(bad), "--out", str(tmp_path / "r2"), *TINY)
    assert out.returncode == 2 and "'zero_optimisation']: unknown key" in out.stderr and "Traceback" not in out.stderr


def test_torchrun_two_processes_match_one_process(corpus, tmp_path):
    one = str(tmp_path / "one")
    assert zerofuse("train", "--data", corpus, "--out", one, "--steps", "20", *TINY).returncode == 0
    two = str(tmp_path / "two")
    env = dict(os.environ, ZEROFUSE_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "zerofuse", "train", "--data", corpus,
                          "--out", two, "--steps", "20", *TINY], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("[zerofuse train] done") == 1  # only rank 0 prints
    a = [float(r["train_loss"]) for r in read_metrics(one)[1:]]
    b = [float(r["train_loss"]) for r in read_metrics(two)[1:]]
    assert b == pytest.approx(a, rel=1e-4)  # ZeRO-2 over 2 ranks, same global batch


def test_torchrun_pipeline_stages_match_one_process(corpus, tmp_path):
    steps = ["--steps", "12", "--micro-batches", "2", *TINY]
    one = str(tmp_path / "one")
    assert zerofuse("train", "--data", corpus, "--out", one, *steps).returncode == 0
    two = str(tmp_path / "two")
    env = dict(os.environ, ZEROFUSE_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "zerofuse", "train", "--data", corpus,
                          "--out", two, "--pipeline-stages", "2", *steps], capture_output=True, text=True, env=env,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 pipeline stages x 1 data-parallel, 2 micro-batches" in out.stdout
    for column in ("train_loss", "val_loss"):
        a = [float(r[column]) for r in read_metrics(one) if r[column]]
        b = [float(r[column]) for r in read_metrics(two) if r[column]]
        assert len(b) == len(a) > 2 and b == pytest.approx(a, rel=1e-4), column
    sample = zerofuse("sample", "--run", two, "--prompt", "the ", "--tokens", "20")
    assert sample.returncode == 0 and sample.stdout.startswith("the "), sample.stderr[-2000:]


def test_torchrun_config_error_is_one_line_and_exit_2_on_every_rank(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 2, "zero_optimisation": {"stage": 2}}')
    env = dict(os.environ, ZEROFUSE_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "zerofuse", "train", "--config", str(bad),
                          "--out", str(tmp_path / "r"), *TINY], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert out.stderr.count("'zero_optimisation']: unknown key") == 1  # rank 0 says it, once
    # torchrun's failure summary lists each rank's exit code: 2, or SIGTERM (-15)
    # for a rank torchrun stopped after the first one exited.
    import re
    codes = re.findall(r"exitcode  : (-?\d+)", out.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, out.stderr[-3000:]


def test_a_fresh_run_in_a_directory_without_checkpoints_rewrites_its_metrics(corpus, tmp_path):
    run = str(tmp_path / "run")
    assert zerofuse("train", "--data", corpus, "--out", run, "--steps", "3", *TINY).returncode == 0
    import shutil
    shutil.rmtree(os.path.join(run, "checkpoints"))
    out = zerofuse("train", "--data", corpus, "--out", run, "--steps", "3", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(run)] == [0, 1, 2, 3]  # one step-0 row, not two


def test_env_reports_the_build():
    out = zerofuse("env")
    assert out.returncode == 0 and "CPU kernels" in out.stdout


def test_bench_train_compares_the_same_model_on_the_same_batches(tmp_path):
    out = zerofuse("bench", "--train", "--quick", "--out", str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (name,) = os.listdir(tmp_path)
    assert name.startswith("cpu-train-L4-C128-T128-B16-")
    with open(tmp_path / name) as f:
        record = json.load(f)
    result = record["results"]
    (round_,) = result["rounds"]
    assert round_["zerofuse_tokens_per_s"] > 0 and round_["torch_tokens_per_s"] > 0
    assert result["ratio_median"] == pytest.approx(round_["zerofuse_tokens_per_s"] / round_["torch_tokens_per_s"],
                                                   rel=1e-2)
    # Same initial weights and batches, different kernels in float32: the losses agree after 5 steps.
    losses = result["final_loss"]
    assert losses["zerofuse"] == pytest.approx(losses["torch"], rel=1e-3)
    assert record["zerofuse_commit"] and record["date"]
