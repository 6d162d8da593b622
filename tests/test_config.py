"""DeepSpeed-compatible configuration: defaults, batch arithmetic, and strict
validation at every depth."""
import json

import pytest

from zerofuse.runtime.config import ConfigError, parse_config

BASE = {"train_micro_batch_size_per_gpu": 4}


def parse(extra, world=1):
    return parse_config(dict(BASE, **extra), world)


def test_deepspeed_defaults():
    c = parse({"fp16": {"enabled": True}})
    assert (c.fp16.initial_scale_power, c.fp16.hysteresis, c.fp16.loss_scale_window, c.fp16.min_loss_scale) == (
        16, 2, 1000, 1.0)
    assert c.fp16.dynamic and c.zero.stage == 0 and c.zero.reduce_bucket_size == 500_000_000
    assert c.gradient_clipping == 0.0 and c.steps_per_print == 10


@pytest.mark.parametrize(
    "given,world,expected",
    [
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5}, 2, (30, 3, 5)),
        ({"train_batch_size": 12}, 3, (12, 4, 1)),
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, 2,
         (16, 2, 4)),
    ],
)
def test_any_two_batch_sizes_imply_the_third(given, world, expected):
    c = parse_config(given, world)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == expected


def test_inconsistent_batch_triple_shows_the_arithmetic():
    with pytest.raises(ConfigError, match=r"train_batch_size \(30\) must equal train_micro_batch_size_per_gpu "
                                          r"\(4\) x gradient_accumulation_steps \(2\) x world size \(2\) = 16"):
        parse_config({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        parse_config({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2)
    with pytest.raises(ConfigError, match="give train_batch_size or train_micro_batch_size_per_gpu"):
        parse_config({"gradient_accumulation_steps": 2})


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"train_batchsize": 4}, r"config\['train_batchsize'\]: unknown key"),
        ({"zero_optimization": {"stage": 4}}, r"\['stage'\]: must be one of 0, 1, 2, 3, got 4"),
        ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 10, "max_live_parameters": 20}},
         r"\['max_live_parameters'\]: is also given as stage3_max_live_parameters with another value"),
        ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": -1}},
         r"\['stage3_param_persistence_threshold'\]: must be >= 0"),
        ({"zero_optimization": {"stage": "2"}}, r"config\['zero_optimization'\]\['stage'\]: must be an integer"),
        ({"zero_optimization": {"overlap_com": True}}, r"\['overlap_com'\]: unknown key"),
        ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, "ZeRO-Infinity .NVMe offload. is not"),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, r"config\['zero_optimization'\]\['reduce_bucket_size'\] is "
                                                                "\"auto\", a placeholder that Hugging Face's Trainer"),
        ({"zero_optimization": {"reduce_bucket_size": 0}}, r"\['reduce_bucket_size'\]: must be >= 1"),
        ({"fp16": {"enabled": True, "hysteresis": 0}}, r"\['fp16'\]\['hysteresis'\]: must be >= 1"),
        ({"fp16": {"enabled": "yes"}}, r"\['fp16'\]\['enabled'\]: must be true or false"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16 and bf16 cannot both be enabled"),
        ({"fp16": {"initial_scale_power": 2, "min_loss_scale": 8}}, "must not exceed the initial scale"),
        ({"optimizer": {"type": "OneBitAdam"}}, r"DeepSpeed's 1-bit Adam .*'OneBitAdam'. is not supported"),
        ({"optimizer": {"type": "NoSuchOpt"}}, "'NoSuchOpt' is neither a DeepSpeed optimizer"),
        ({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentun": 0.9}}}, r"\['momentun'\]: unknown key"),
        ({"optimizer": {"type": "Lamb", "params": {"max_grad_norm": 1.0}}}, "use the top-level 'gradient_clipping'"),
        ({"optimizer": {"type": "Lamb", "params": {"min_coeff": 2.0, "max_coeff": 1.0}}}, "must not exceed max_coeff"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": -1}}}, r"\['lr'\]: must be >= 0"),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.0]}}}, r"\['betas'\]\[1\]: must be < 1"),
        ({"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}}, "must be true for type 'AdamW'"),
        ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}}, "amsgrad"),
        ({"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}}, r"\['momentum'\]: unknown key"),
        ({"scheduler": {"type": "OneCycle"}}, r"\['cycle_min_lr'\]: is required for OneCycle"),
        ({"scheduler": {"type": "StepLR"}}, "must be one of 'WarmupLR', 'WarmupDecayLR', 'WarmupCosineLR'"),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "total_num_steps'\\]: is required for WarmupDecayLR"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}}, "must be one of 'log', 'linear'"),
        ({"gradient_clipping": -1.0}, r"\['gradient_clipping'\]: must be >= 0"),
        ({"activation_checkpointing": {"partitions": True}}, r"\['partitions'\]: unknown key"),
        ({"tensor_parallel": {"autotp_size": 0}}, r"\['tensor_parallel'\]\['autotp_size'\]: must be >= 1"),
        ({"tensor_parallel": {"autotp_size": 2, "tp_size": 2}}, r"\['tp_size'\]: unknown key"),
        ({"tensor_parallel": {"autotp_size": 2}, "zero_optimization": {"stage": 3}}, "cannot be combined with ZeRO"),
        ({"hybrid_engine": {"enabled": True}}, "the RLHF hybrid engine is not supported"),
        ({"torch_autocast": {"enabled": True, "dtype": "int8"}}, "must be 'bfloat16' or 'float16'"),
        ({"torch_autocast": {"enabled": True}, "bf16": {"enabled": True}}, "cannot be combined with fp16 or bf16"),
        ({"sparse_gradients": True}, "sparse gradients"),
        ({"data_types": {"grad_accum_dtype": "fp32"}, "bf16": {"enabled": True}}, "accumulates gradients in the"),
        ({"tensorboard": {"enabled": True, "path": "x"}}, r"\['tensorboard'\]\['path'\]: unknown key"),
        ({"communication_data_type": "int8"}, "must be one of 'fp32', 'fp16', 'bf16', 'bfp16'"),
        ({"gradient_predivide_factor": 0}, r"\['gradient_predivide_factor'\]: must be > 0"),
    ],
)
def test_invalid_settings_name_the_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        parse(extra)


def test_keys_without_effect_for_zero12_are_accepted_and_listed():
    c = parse({"zero_optimization": {"stage": 2, "allgather_partitions": True, "round_robin_gradients": False,
                                     "stage3_max_live_parameters": 1e9, "offload_optimizer": {"device": "none"}},
               "zero_allow_untested_optimizer": True, "fp16": {"enabled": True, "auto_cast": False},
               "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False},
               "flops_profiler": {"enabled": False, "profile_step": 1}})
    assert c.zero.stage == 2
    assert "config['zero_optimization']['allgather_partitions']" in c.inert_keys
    assert "config['zero_optimization']['stage3_max_live_parameters']" in c.inert_keys
    assert c.zero_allow_untested_optimizer  # read now: it gates client optimizers under ZeRO


def test_stage3_keys_under_both_names():
    c = parse({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 5e6, "param_persistence_threshold": 7,
                                     "stage3_max_live_parameters": 3e7, "max_reuse_distance": 0,
                                     "stage3_gather_16bit_weights_on_model_save": True}})
    z = c.zero
    assert (z.stage, z.prefetch_bucket_size, z.param_persistence_threshold, z.max_live_parameters,
            z.max_reuse_distance, z.gather_16bit_weights_on_model_save) == (3, 5_000_000, 7, 30_000_000, 0, True)
    assert not c.inert_keys
    # DeepSpeed's defaults.
    z = parse({"zero_optimization": {"stage": 3}}).zero
    assert (z.prefetch_bucket_size, z.param_persistence_threshold, z.max_live_parameters, z.max_reuse_distance,
            z.gather_16bit_weights_on_model_save) == (50_000_000, 100_000, 1_000_000_000, 1_000_000_000, False)
    assert parse({"zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}}
                 ).zero.gather_16bit_weights_on_model_save


def test_use_multi_rank_bucket_allreduce_is_a_known_zero12_key():
    # It once sat inside a comment in the inert list and was refused as unknown.
    c = parse({"zero_optimization": {"stage": 1, "use_multi_rank_bucket_allreduce": True}})
    assert "config['zero_optimization']['use_multi_rank_bucket_allreduce']" in c.inert_keys


def test_contiguous_gradients_is_validated_and_listed_as_without_effect():
    c = parse({"zero_optimization": {"stage": 2, "contiguous_gradients": False}})
    assert "config['zero_optimization']['contiguous_gradients']" in c.inert_keys
    assert "contiguous_gradients" not in c.to_dict()["zero_optimization"]
    with pytest.raises(ConfigError, match=r"\['contiguous_gradients'\]: must be true or false"):
        parse({"zero_optimization": {"contiguous_gradients": "yes"}})


def test_a_typical_deepspeed_zero2_file_parses(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({
        "train_batch_size": 64, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0, "steps_per_print": 50,
        "optimizer": {"type": "Adam", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 1000, "warmup_max_lr": 3e-4,
                                                          "warmup_num_steps": 100}},
        "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "initial_scale_power": 12,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                              "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                              "contiguous_gradients": True},
    }))
    c = parse_config(str(path), world_size=4)
    assert c.train_micro_batch_size_per_gpu == 8 and c.zero.reduce_bucket_size == 200_000_000
    assert c.optimizer.type == "Adam" and c.optimizer.params["adam_w_mode"]  # DeepSpeed's "Adam" is AdamW by default
    assert c.to_dict()["fp16"]["initial_scale_power"] == 12


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        parse_config(str(bad))
    with pytest.raises(ConfigError, match="must be a dict or the path"):
        parse_config(42)


def test_every_auto_value_is_named_in_one_error():
    with pytest.raises(ConfigError) as err:
        parse({"train_batch_size": "auto", "gradient_clipping": "auto",
               "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, "auto"]}}})
    message = str(err.value)
    for key in ("config['train_batch_size']", "config['gradient_clipping']", "config['optimizer']['params']['lr']",
                "config['optimizer']['params']['betas'][1]"):
        assert key in message
    assert "Hugging Face's Trainer" in message


def test_offload_to_the_cpu_is_accepted_on_a_cpu_engine_only():
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    c = parse_config(dict(BASE, **offload), 1, cpu_engine=True)
    assert any("offload_optimizer" in k and "runs on the CPU" in k for k in c.inert_keys)
    with pytest.raises(ConfigError, match=r"\['offload_optimizer'\]: ZeRO-Offload .* is not supported"):
        parse_config(dict(BASE, **offload), 1, cpu_engine=False)


def test_deepspeed_example_style_configs_parse():
    # The shapes of configs shipped with DeepSpeed's examples (keys and values written here).
    configs = [
        {"train_batch_size": 16, "steps_per_print": 2000, "prescale_gradients": False,
         "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8,
                                                  "weight_decay": 3e-7}},
         "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                      "warmup_num_steps": 1000}},
         "gradient_clipping": 1.0, "wall_clock_breakdown": False, "fp16": {"enabled": True, "loss_scale": 0,
                                                                           "initial_scale_power": 15}},
        {"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 64, "steps_per_print": 1000,
         "prescale_gradients": True, "gradient_predivide_factor": 1.0,
         "optimizer": {"type": "Lamb", "params": {"lr": 11e-3, "weight_decay": 0.01, "bias_correction": False,
                                                  "max_coeff": 0.3, "min_coeff": 0.01}},
         "gradient_clipping": 1.0, "fp16": {"enabled": True, "loss_scale": 0}},
        {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "cuda_visible_devices": "0,1",
         "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
         "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3,
                                                      "cycle_first_step_size": 100}},
         "zero_allow_untested_optimizer": True, "dataloader_drop_last": True,
         "activation_checkpointing": {"partition_activations": True, "contiguous_memory_optimization": False,
                                      "number_checkpoints": 4},
         "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
         "zero_optimization": {"stage": 1, "contiguous_gradients": True, "cpu_offload": False},
         "pipeline": {"stages": "2"}, "flops_profiler": {"enabled": False},
         "checkpoint": {"tag_validation": "Warn"}, "timers": {"throughput": {"enabled": True}}},
    ]
    for world, cfg in zip((4, 64, 2), configs):
        c = parse_config(cfg, world)
        assert c.to_dict()["train_batch_size"] == c.train_batch_size
    lamb = parse_config(configs[1], 64)
    assert lamb.optimizer.kind == "lamb" and lamb.prescale_gradients
    sgd = parse_config(configs[2], 2)
    assert sgd.optimizer.kind == "torch" and sgd.optimizer.params == {"lr": 0.1, "momentum": 0.9}
    assert "config['cuda_visible_devices']" in sgd.inert_keys


def test_shapes_from_deepspeeds_examples_parse():
    # Keys seen in DeepSpeed's example configs that its runtime ignores or overrides.
    c = parse({"bf16": {"enabled": True, "bf16_master_weights_and_grads": False, "loss_scale": 0,
                        "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 15},
               "prescale_gradients": True, "gradient_predivide_factor": 8,
               "sparse_attention": {"mode": "fixed", "block": 16}, "cuda_visible_devices": 0,
               "fp16": {"enabled": False, "auto_cast": True}})
    assert c.bf16_enabled and c.prescale_gradients and c.gradient_predivide_factor == 1.0
    assert "config['bf16']['loss_scale_window']" in c.inert_keys
    assert any(k.startswith("config['gradient_predivide_factor']") for k in c.inert_keys)
    assert "config['sparse_attention']" in c.inert_keys
