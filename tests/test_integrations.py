"""zerofuse.optimize and attn_implementation="zerofuse" on Hugging Face
transformers models built from configs (random weights, no download)."""
import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

import zerofuse
import zerofuse.integrations.transformers as zf_transformers

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach zerofuse's kernel (not the SDPA fallback)."""
    calls = []
    real = zf_transformers.attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("key_padding_mask") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(zf_transformers, "attention", spy)
    return calls


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=61, n_positions=32, bos_token_id=0,
                                      eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))


def test_optimize_swaps_layer_norms_keeping_the_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Sequential(torch.nn.LayerNorm(8)))
    params = list(model.parameters())
    x = torch.randn(3, 8)
    before = model(x)
    zerofuse.optimize(model)
    assert type(model[1]) is zerofuse.nn.LayerNorm and type(model[2][0]) is zerofuse.nn.LayerNorm
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    torch.testing.assert_close(model(x), before)


def test_gpt2_with_padding_runs_zerofuse_attention_and_matches_sdpa(kernel_calls):
    model = gpt2().eval()
    ids = torch.randint(0, 61, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    reference = model(ids, attention_mask=mask).logits
    plain = model(ids).logits
    zerofuse.optimize(model)
    assert model.config._attn_implementation == "zerofuse"
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()], reference[mask.bool()],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, plain, rtol=1e-4, atol=1e-5)
    assert len(kernel_calls) == 4 and kernel_calls.count(True) == 2  # 2 layers x 2 calls; padding used once


def test_attn_implementation_name_works_at_construction(kernel_calls):
    zf_transformers.register()
    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="zerofuse")
    assert model.config._attn_implementation == "zerofuse"
    model.eval()(torch.randint(0, 50, (2, 9)))
    assert kernel_calls
    model.train()(torch.randint(0, 50, (2, 9)))  # attention dropout (0.1) in training: SDPA's path
    assert len(kernel_calls) == 1


def test_gpt2_pretraining_through_the_engine(kernel_calls):
    model = zerofuse.optimize(gpt2())
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 8, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}, "zero_optimization": {"stage": 2}})
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(25):
        # A learnable stream: each sequence counts up from a random start.
        start = torch.randint(0, 40, (8, 1), generator=g)
        ids = (start + torch.arange(24)) % 61
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert kernel_calls
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_bert_classifier_finetuning_example(kernel_calls):
    sys.path.insert(0, EXAMPLES)
    try:
        from finetune_classifier import main
        with contextlib.redirect_stdout(io.StringIO()):
            first, last, accuracy = main(["--steps", "120"])
    finally:
        sys.path.remove(EXAMPLES)
    assert kernel_calls and any(kernel_calls)  # padding masks went to the kernel
    assert last < 0.5 * first and accuracy > 0.9


def test_unsupported_masks_fall_back_to_sdpa(kernel_calls):
    from zerofuse.integrations.transformers import zerofuse_attention_forward

    class Module(torch.nn.Module):
        is_causal = False

    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    arbitrary = torch.rand(2, 1, 6, 6) > 0.3  # not causal + key padding: SDPA handles it
    arbitrary[..., 0] = True
    out, _ = zerofuse_attention_forward(Module().eval(), q, k, v, arbitrary)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=arbitrary).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    assert not kernel_calls


def test_train_gpt_example_runs():
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, "train_gpt.py"), "--steps", "5"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, ZEROFUSE_NUM_THREADS="2"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "validation loss" in out.stdout


@pytest.mark.parametrize("transformers_first", [False, True])
def test_attn_implementation_zerofuse_works_after_a_plain_import(transformers_first):
    # A fresh interpreter: nothing registered yet. `import zerofuse` alone must
    # make attn_implementation="zerofuse" acceptable, whichever is imported
    # first, without importing transformers itself.
    code = "\n".join([
        "import sys",
        "import transformers.modeling_utils" if transformers_first else "",
        "import zerofuse",
        "assert transformers_first or 'transformers' not in sys.modules, 'import zerofuse imported transformers'",
        "import torch",
        "from transformers import AutoModelForCausalLM, GPT2Config",
        "config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, bos_token_id=0, eos_token_id=0)",
        "model = AutoModelForCausalLM.from_config(config, attn_implementation='zerofuse')",
        "assert model.config._attn_implementation == 'zerofuse', model.config._attn_implementation",
        "print(tuple(model(torch.randint(0, 50, (2, 7))).logits.shape))",
    ])
    result = subprocess.run([sys.executable, "-c", f"transformers_first = {transformers_first}\n" + code],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("(2, 7, 50)")
