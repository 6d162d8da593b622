"""Unmodified DeepSpeed scripts on zerofuse: the examples in
examples/deepspeed run through `zerofuse launch` at world sizes 1 and 2; the
`import deepspeed` alias; the launcher's options; and a table of DeepSpeed's
public names, each present or refused at use with one line naming it."""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zerofuse.deepspeed as deepspeed
from dist_harness import free_port
from zerofuse.cli import launch
from zerofuse.deepspeed._unsupported import NotSupported

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples", "deepspeed")
ENV = dict(os.environ, OMP_NUM_THREADS="1", ZEROFUSE_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def zerofuse_launch(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "zerofuse", "launch", "--master_port", str(free_port()), *args],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def lines(out, prefix):
    return [line for line in out.stdout.splitlines() if line.startswith(prefix)]


def test_image_classifier_example_at_world_size_2():
    out = zerofuse_launch("--num_gpus", "2", os.path.join(EXAMPLES, "image_classifier.py"), "--deepspeed",
                          "--deepspeed_config", os.path.join(EXAMPLES, "ds_config.json"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    epochs = [float(line.split()[-1]) for line in lines(out, "epoch ")]
    assert len(epochs) == 2 and epochs[1] < epochs[0]  # only rank 0 prints, and it learns
    assert lines(out, "accuracy")[0].endswith("after 32 steps")  # 256 images / 16 per step x 2 epochs


def test_pipeline_example_trains_the_same_at_one_and_two_stages():
    # DeepSpeed's pipeline example shape: PipelineModule over a layer list
    # (with a lambda), training_data given to initialize, engine.train_batch().
    runs = []
    for stages in (1, 2):
        out = zerofuse_launch("--num_gpus", str(stages), os.path.join(EXAMPLES, "pipeline_classifier.py"), "-p",
                              str(stages), "--deepspeed_config", os.path.join(EXAMPLES, "ds_config_pipe.json"))
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        runs.append([float(line.split()[-1]) for line in lines(out, "step ")])
    assert len(runs[0]) == 4 and runs[0][-1] < runs[0][0]  # it learns
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_bert_example_resumes_from_its_client_state_checkpoint(tmp_path):
    config = os.path.join(EXAMPLES, "ds_config_bert.json")
    script = os.path.join(EXAMPLES, "bert_mlm.py")
    straight = zerofuse_launch("--num_gpus", "2", script, "--deepspeed_config", config, "--output_dir",
                               str(tmp_path / "a"), "--steps", "4")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = zerofuse_launch("--num_gpus", "2", script, "--deepspeed_config", config, "--output_dir",
                            str(tmp_path / "b"), "--steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = zerofuse_launch("--num_gpus", "2", script, "--deepspeed_config", config, "--output_dir",
                              str(tmp_path / "b"), "--steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert lines(resumed, "step ") == lines(straight, "step ")[2:]  # the same losses as without the stop
    assert "resumed from" in resumed.stdout + resumed.stderr


def test_custom_optimizer_example_in_one_process():
    out = zerofuse_launch(os.path.join(EXAMPLES, "custom_optimizer.py"), "--deepspeed_config",
                          os.path.join(EXAMPLES, "ds_config_custom.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    steps = lines(out, "step ")
    assert len(steps) == 8
    assert [float(s.split()[3]) for s in steps][:2] == pytest.approx([0.05 / 2, 0.05 / 3], abs=1e-5)  # the client's LambdaLR


def _run_alias(tmp_path, code, extra_path=None):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(ENV)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "zerofuse.deepspeed", str(script)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_import_deepspeed_resolves_to_zerofuse_in_the_runner(tmp_path):
    out = _run_alias(tmp_path, """
        import sys
        import deepspeed
        import deepspeed.comm as dist
        from deepspeed.ops.adam import FusedAdam
        from deepspeed.runtime.lr_schedules import WarmupLR
        from deepspeed.moe.layer import MoE          # imports: refused only when used
        import zerofuse.deepspeed
        assert deepspeed is zerofuse.deepspeed and FusedAdam is zerofuse.deepspeed.ops.adam.FusedAdam
        assert sys.modules["deepspeed.comm"] is sys.modules["zerofuse.deepspeed.comm"]
        try:
            MoE(hidden_size=8)
        except NotImplementedError as e:
            print("refused:", e)
        print("ops", sum(name.startswith("zerofuse.ops") for name in sys.modules) > 0)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: deepspeed.moe.layer.MoE: mixture of experts is not supported by zerofuse" in out.stdout


def test_the_alias_wins_over_an_installed_deepspeed(tmp_path):
    fake = tmp_path / "site"
    (fake / "deepspeed").mkdir(parents=True)
    (fake / "deepspeed" / "__init__.py").write_text("raise RuntimeError('the real DeepSpeed was imported')\n")
    out = _run_alias(tmp_path, "import deepspeed\nprint(deepspeed.__version__)\n", extra_path=str(fake))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "+zerofuse" in out.stdout
    assert out.stderr.count("a DeepSpeed installation was found") == 1


def test_launch_reports_a_config_error_once_with_status_2(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "OneBitAdam"}}')
    out = zerofuse_launch("--num_gpus", "2", os.path.join(EXAMPLES, "custom_optimizer.py"), "--deepspeed_config",
                          str(bad))
    assert out.returncode == 2
    assert out.stderr.count("1-bit Adam") == 1 and "Traceback" not in out.stderr


def test_launch_returns_a_failing_scripts_status(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(3)\n")
    out = zerofuse_launch(str(script))
    assert out.returncode == 3 and "rank 0 failed (exit status 3)" in out.stderr


# --- the launcher's resource handling and multi-node commands ---------------------------------------


def test_hostfile_and_resource_filters():
    pool = launch.parse_hostfile(["# comment", "worker-0 slots=4", "", "worker-1 slots=2"])
    assert dict(pool) == {"worker-0": 4, "worker-1": 2}
    assert dict(launch.filter_resources(pool, include="worker-0@worker-1:0,1")) == {"worker-0": [0, 1, 2, 3],
                                                                                     "worker-1": [0, 1]}
    assert dict(launch.filter_resources(pool, exclude="worker-0:1")) == {"worker-0": [0, 2, 3], "worker-1": [0, 1]}
    assert dict(launch.filter_resources(pool, exclude="worker-1")) == {"worker-0": [0, 1, 2, 3]}
    with pytest.raises(launch.LaunchError, match="has no slot 5"):
        launch.filter_resources(pool, include="worker-1:5")
    with pytest.raises(launch.LaunchError, match="bad entry"):
        launch.parse_hostfile(["worker-0 4"])


@pytest.mark.parametrize("backend", ["pdsh", "ssh", "slurm"])
def test_multi_node_commands_start_torchrun_on_every_host(tmp_path, backend):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    args = launch.build_parser().parse_args(["-H", str(hostfile), "--launcher", backend, "--master_port", "1234",
                                             "train.py", "--lr", "0.1"])
    commands = launch.remote_commands(args, launch.resources(args))
    assert [host for host, _ in commands] == ["node-a", "node-b"]
    rank = {"pdsh": "%n", "slurm": "$SLURM_NODEID", "ssh": "1"}[backend]
    cmd = commands[1][1]
    for part in ("torch.distributed.run", "--nproc-per-node=2", "--nnodes=2", f"--node-rank={rank}",
                 "--master-addr=node-a", "--master-port=1234", "zerofuse.deepspeed train.py --lr 0.1",
                 "ZEROFUSE_PASS_LOCAL_RANK=1"):
        assert part in cmd, (part, cmd)
    invocation = launch._launcher_invocation(args, commands)
    assert invocation[0][0] == {"pdsh": "pdsh", "ssh": "ssh", "slurm": "srun"}[backend]
    assert len(invocation) == (2 if backend == "ssh" else 1)


# --- DeepSpeed's public names ---------------------------------------------------------------------------

PRESENT = [
    "initialize", "add_config_arguments", "init_distributed", "comm", "accelerator", "ops", "utils", "runtime",
    "checkpointing", "DeepSpeedEngine", "DeepSpeedConfig", "DeepSpeedConfigError", "log_dist", "logger",
    "OnDevice", "__version__", "get_accelerator", "DeepSpeedDataLoader",
    "comm.get_rank", "comm.get_world_size", "comm.get_local_rank", "comm.barrier", "comm.all_reduce",
    "comm.broadcast", "comm.all_gather", "comm.is_initialized", "comm.init_distributed", "comm.ReduceOp",
    "comm.reduce_scatter_tensor", "comm.all_gather_into_tensor", "comm.new_group", "comm.send", "comm.recv",
    "ops.adam.FusedAdam", "ops.adam.DeepSpeedCPUAdam", "ops.lamb.FusedLamb",
    "zero.Init", "zero.GatheredParameters", "zero.register_external_parameter", "zero.unregister_external_parameter",
    "zero.ZeroParamStatus", "zero.ZeroParamType", "runtime.zero.partition_parameters.ZeroParamStatus",
    "utils.logger", "utils.RepeatingLoader", "utils.log_dist",
    "checkpointing.checkpoint", "checkpointing.configure", "checkpointing.is_configured", "checkpointing.reset",
    "checkpointing.get_cuda_rng_tracker", "checkpointing.model_parallel_cuda_manual_seed",
    "runtime.lr_schedules.WarmupLR", "runtime.lr_schedules.WarmupDecayLR", "runtime.lr_schedules.WarmupCosineLR",
    "runtime.lr_schedules.OneCycle", "runtime.lr_schedules.LRRangeTest", "runtime.lr_schedules.VALID_LR_SCHEDULES",
    "runtime.dataloader.RepeatingLoader", "runtime.engine.DeepSpeedEngine", "runtime.utils.see_memory_usage",
    "runtime.activation_checkpointing.checkpointing.checkpoint",
    "pipe.PipelineModule", "pipe.LayerSpec", "pipe.TiedLayerSpec", "pipe.ProcessTopology", "PipelineModule",
    "PipelineEngine", "runtime.pipe.module.PipelineModule", "runtime.pipe.topology.PipeModelDataParallelTopology",
    "runtime.pipe.topology.PipeDataParallelTopology", "runtime.pipe.engine.PipelineEngine", "tp_model_init",
]
REFUSED_AT_USE = ["moe.layer.MoE", "init_inference", "DeepSpeedTransformerLayer", "inference.engine.InferenceEngine",
                  "compression.compress.init_compression", "DeepSpeedHybridEngine", "zero.TiledLinear",
                  "zero.MiCS_Init"]
ENGINE_METHODS = [
    "backward", "step", "train_batch", "save_checkpoint", "load_checkpoint", "module_state_dict",
    "load_module_state_dict", "save_16bit_model", "save_fp16_model", "fp16_enabled", "bfloat16_enabled",
    "zero_optimization_stage", "gradient_accumulation_steps", "loss_scale", "train_batch_size",
    "train_micro_batch_size_per_gpu", "steps_per_print", "wall_clock_breakdown", "get_lr", "get_mom",
    "get_global_grad_norm", "is_gradient_accumulation_boundary", "set_gradient_accumulation_boundary",
    "was_step_applied", "no_sync", "zero_grad", "destroy", "deepspeed_io", "optimizer_name", "scheduler_name",
    "zero_optimization", "gradient_clipping", "dynamic_loss_scale", "get_data_parallel_rank",
    "dataloader_drop_last", "empty_partition_cache", "allreduce_gradients",
]


def _resolve(path):
    obj = deepspeed
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", PRESENT)
def test_deepspeed_names_exist(name):
    assert _resolve(name) is not None


@pytest.mark.parametrize("name", REFUSED_AT_USE)
def test_deepspeed_names_zerofuse_lacks_are_refused_when_used(name):
    thing = _resolve(name)
    with pytest.raises(NotSupported, match=f"{name.split('.')[-1]}: .* is not supported by zerofuse"):
        thing()


def test_deepspeed_zero_is_zerofuses_zero3():
    import zerofuse.zero
    assert deepspeed.zero is deepspeed.runtime.zero  # one module under both of DeepSpeed's paths
    assert deepspeed.zero.Init is zerofuse.zero.Init
    assert deepspeed.zero.GatheredParameters is zerofuse.zero.GatheredParameters
    assert deepspeed.zero.ZeroParamStatus.NOT_AVAILABLE is zerofuse.zero.ZeroParamStatus.NOT_AVAILABLE


@pytest.mark.parametrize("name", ENGINE_METHODS)
def test_engine_has_deepspeeds_methods(name):
    assert callable(getattr(deepspeed.DeepSpeedEngine, name))


def test_initialize_in_one_process_starts_a_group_of_one():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group exists already")
    try:
        engine, opt, loader, sched = deepspeed.initialize(model=torch.nn.Linear(4, 2), config={
            "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000})
        assert dist.is_initialized() and deepspeed.comm.get_world_size() == 1
        assert engine.optimizer is opt and loader is None and sched is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_checkpointing_recomputes_with_the_same_dropout():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 1))
    x = torch.randn(5, 6, requires_grad=True)
    torch.manual_seed(1)
    deepspeed.checkpointing.checkpoint(layer, x).sum().backward()
    ckpt = x.grad.clone()
    x.grad = None
    torch.manual_seed(1)
    layer(x).sum().backward()
    assert torch.equal(ckpt, x.grad)
    deepspeed.checkpointing.configure(None, deepspeed_config={"activation_checkpointing": {"cpu_checkpointing": True}})
    try:
        x.grad = None
        torch.manual_seed(1)
        deepspeed.checkpointing.checkpoint(layer, x).sum().backward()
        assert torch.equal(ckpt, x.grad)
    finally:
        deepspeed.checkpointing.configure(None, checkpoint_in_cpu=False)


def test_rng_tracker_forks_named_states():
    tracker = deepspeed.checkpointing.get_cuda_rng_tracker()
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(7)
    with tracker.fork():
        a = torch.rand(3)
    b = torch.rand(3)  # the default state, seeded with 7, was not advanced by the fork
    torch.manual_seed(7)
    assert torch.equal(b, torch.rand(3))
    torch.manual_seed(7 + 2718)
    assert torch.equal(a, torch.rand(3))


def test_module_paths_import_as_deepspeed_would():
    for name in ("zerofuse.deepspeed.comm", "zerofuse.deepspeed.ops.adam", "zerofuse.deepspeed.utils.zero_to_fp32",
                 "zerofuse.deepspeed.runtime.lr_schedules", "zerofuse.deepspeed.accelerator"):
        importlib.import_module(name)
