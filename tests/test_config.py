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
        ({"zero_optimization": {"stage": 3}}, r"ZeRO stage 3 is not supported by zerofuse \(allowed: 0, 1, 2\)"),
        ({"zero_optimization": {"stage": "2"}}, r"config\['zero_optimization'\]\['stage'\]: must be an integer"),
        ({"zero_optimization": {"overlap_com": True}}, r"\['overlap_com'\]: unknown key"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "optimizer offload is not supported"),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "Hugging Face Trainer placeholder"),
        ({"zero_optimization": {"reduce_bucket_size": 0}}, r"\['reduce_bucket_size'\]: must be >= 1"),
        ({"fp16": {"enabled": True, "hysteresis": 0}}, r"\['fp16'\]\['hysteresis'\]: must be >= 1"),
        ({"fp16": {"enabled": "yes"}}, r"\['fp16'\]\['enabled'\]: must be true or false"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16 and bf16 cannot both be enabled"),
        ({"fp16": {"initial_scale_power": 2, "min_loss_scale": 8}}, "must not exceed the initial scale"),
        ({"optimizer": {"type": "SGD"}}, "zerofuse runs Adam and AdamW, got 'SGD'"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": -1}}}, r"\['lr'\]: must be >= 0"),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.0]}}}, r"\['betas'\]\[1\]: must be < 1"),
        ({"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}}, "must be true for type 'AdamW'"),
        ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}}, "amsgrad"),
        ({"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}}, r"\['momentum'\]: unknown key"),
        ({"scheduler": {"type": "OneCycle"}}, "must be one of 'WarmupLR', 'WarmupDecayLR', 'WarmupCosineLR'"),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "total_num_steps'\\]: is required for WarmupDecayLR"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}}, "must be one of 'log', 'linear'"),
        ({"gradient_clipping": -1.0}, r"\['gradient_clipping'\]: must be >= 0"),
        ({"pipeline": {"stages": 2}}, "pipeline parallelism is not supported"),
        ({"activation_checkpointing": {"partition_activations": True}}, "activation checkpointing is not supported"),
        ({"tensorboard": {"enabled": True, "path": "x"}}, r"\['tensorboard'\]\['path'\]: unknown key"),
        ({"communication_data_type": "int8"}, "must be one of 'fp32', 'fp16', 'bf16', 'bfp16'"),
        ({"prescale_gradients": True}, "prescale_gradients'\\]: is not supported"),
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
    assert "config['zero_allow_untested_optimizer']" in c.inert_keys


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
    assert c.optimizer.type == "Adam" and c.optimizer.adam_w_mode  # DeepSpeed's "Adam" is AdamW by default
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
