"""Pipeline parallelism against one process: a GPT split into 2, 3 and 4
stages (and 2 stages x 2 data-parallel ranks) trained with train_batch
matches the same layers trained in one process without zerofuse.pipe, in
fp32, bf16 and fp16 with loss scaling; tied embeddings, activation
checkpointing, an overflow on one stage, checkpoints across stage counts,
evaluation, and a failing stage that must not hang its neighbours."""
import contextlib
import io

import pytest
import torch
import torch.distributed as dist

import pipe_models as pm
import zerofuse
from dist_harness import gather_master, run_world, run_world_unsynchronised
from zerofuse.checkpoint import to_fp32_state_dict
from zerofuse.pipe import PipelineError

MICRO, ACCUM, STEPS, LR, WD, CLIP = 2, 4, 3, 1e-2, 0.1, 0.5


def config(dtype="fp32", stage=1, **extra):
    c = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": CLIP,
         "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.99]}},
         "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6}
    if dtype == "bf16":
        c["bf16"] = {"enabled": True}
    if dtype == "fp16":
        c["fp16"] = {"enabled": True, "initial_scale_power": 8}
    c.update(extra)
    return c


def make_engine(model, cfg):
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model, config=cfg)
    return engine


def micro_batches(step, dp, d, accum=ACCUM):
    """This data-parallel rank's micro-batches of the step's global batch
    (micro-batch m of rank d is rows (m * dp + d) * MICRO onwards)."""
    tokens, targets = pm.batch(step, MICRO * accum * dp)
    rows = [slice((m * dp + d) * MICRO, (m * dp + d + 1) * MICRO) for m in range(accum)]
    return iter([(tokens[r], targets[r]) for r in rows])


def train(engine, steps, first=0):
    g = engine.grid
    return [engine.train_batch(micro_batches(s, g.data_parallel_size, g.data_parallel_id, engine.micro_batches)).item()
            for s in range(first, first + steps)]


def masters(engine):
    """Every parameter's fp32 master value on rank 0, by pipeline name, from
    the stage that holds its primary copy (data-parallel pieces assembled)."""
    opt = engine.optimizer
    state = opt.state_dict()
    skip = {id(p) for p in engine.module.tied_copies_not_primary()}
    names = state["param_names"]
    keep = {n for n, p in opt.named_trainable_parameters() if id(p) not in skip}
    shapes = {n: p.shape for n, p in opt.named_trainable_parameters()}
    mine = (names, shapes, keep, state["slices"], state["master"])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out, shapes = {}, {}
    for names_, shapes_, keep_, slices, master in everyone:
        cursor = 0
        for index, first, length in slices.tolist():
            name = names_[index]
            if name in keep_:
                shapes[name] = shapes_[name]
                flat = out.setdefault(name, torch.full((shapes_[name].numel(),), float("nan")))
                flat[first:first + length] = master[cursor:cursor + length]
            cursor += length
    return {n: t.view(shapes[n]) for n, t in out.items()}


def assert_same_training(got, expected, name):
    """Parameters after STEPS steps of Adam at LR 1e-2 (each step moves an
    element by about LR): on average within 1e-6, and every element within 1%
    of one step. Not 1e-5 each: an element whose gradient is near Adam's eps
    (a sum that cancels to ~1e-8) turns a rounding difference of that sum --
    another kernel's summation order -- into ~1e-5 of update; a real error
    (a missing or doubled gradient) moves elements by a whole step."""
    diff = (got - expected).abs()
    assert diff.mean().item() < 1e-6, f"{name}: mean difference {diff.mean().item():.3g}"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=name)


def reference(steps, tied=True, dp=1):
    """torch AdamW + clip_grad_norm_ on the plain model over each step's whole batch."""
    model = pm.Reference(tied=tied)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.99))
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(*pm.batch(step, MICRO * ACCUM * dp))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    names = model.pipeline_names()
    return losses, {names[n]: p.detach().clone() for n, p in model.named_parameters()}


def _train(rank, world, stages, dtype="fp32", zero_stage=1, tied=True, module_kwargs=None):
    engine = make_engine(pm.pipeline_model(num_stages=stages, tied=tied, **(module_kwargs or {})),
                         config(dtype, zero_stage))
    losses = train(engine, STEPS)
    return losses, masters(engine)


# (world, stages, ZeRO stage, tied, PipelineModule arguments)
FP32_CASES = [
    (2, 2, 1, True, {}),
    (3, 3, 2, False, {"partition_method": "uniform"}),
    (4, 4, 0, True, {"activation_checkpoint_interval": 1}),
    (4, 2, 1, True, {"partition_method": "type:block"}),  # 2 stages x 2 data-parallel ranks
]


@pytest.mark.parametrize("world,stages,zero_stage,tied,kwargs", FP32_CASES)
def test_fp32_pipeline_matches_one_process(world, stages, zero_stage, tied, kwargs):
    losses, master = run_world(world, _train, stages, "fp32", zero_stage, tied, kwargs)
    ref_losses, ref_params = reference(STEPS, tied, dp=world // stages)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert sorted(master) == sorted(ref_params)
    for name, value in ref_params.items():
        assert_same_training(master[name], value, name)


def _one_process_engine(dtype, tied):
    """The same layers through the data-parallel engine in one process, the
    same micro-batches accumulated (the low-precision reference)."""
    model = pm.Reference(tied=tied)
    engine = make_engine(model, config(dtype, 1))
    losses = []
    for step in range(STEPS):
        total = 0.0
        for tokens, targets in micro_batches(step, 1, 0):
            loss = engine(tokens, targets)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / ACCUM)
    names = model.pipeline_names()
    return losses, {names[n]: v for n, v in gather_master(engine).items()}


def update_error(final, reference_final, initial):
    moved = torch.cat([(final[n] - initial[n]).flatten() for n in reference_final])
    ref_moved = torch.cat([(reference_final[n] - initial[n]).flatten() for n in reference_final])
    return ((moved - ref_moved).norm() / ref_moved.norm()).item()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_untied_pipeline_equals_one_process(dtype):
    # Untied, every gradient is summed in the same order as in one process:
    # only the gradient norm's sum is split differently.
    ref_losses, ref_master = _one_process_engine(dtype, False)
    losses, master = run_world(2, _train, 2, dtype, 1, False)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    _, initial = reference(0, tied=False)
    assert update_error(master, ref_master, initial) < 1e-5


def test_bf16_tied_pipeline_is_as_close_to_fp32_as_one_process():
    # Tied, the embedding's and the head's gradients are summed per stage and
    # then across stages, in one process per micro-batch: bf16 rounds the two
    # orders differently, so both are compared with the fp32 reference.
    one_losses, one_master = _one_process_engine("bf16", True)
    losses, master = run_world(2, _train, 2, "bf16", 1, True)
    fp32_losses, fp32_master = reference(STEPS)
    _, initial = reference(0)
    pipe_error, one_error = update_error(master, fp32_master, initial), update_error(one_master, fp32_master, initial)
    assert pipe_error < 1.1 * one_error  # measured: 0.0570 and 0.0570
    assert losses == pytest.approx(fp32_losses, rel=1e-2) and one_losses == pytest.approx(fp32_losses, rel=1e-2)


def _overflow_on_first_stage(rank, world):
    cfg = config("fp16", 1)
    cfg["fp16"]["hysteresis"] = 1  # the first overflow halves the scale
    engine = make_engine(pm.pipeline_model(num_stages=world), cfg)
    before_scale = engine.loss_scale()
    train(engine, 1)
    params_before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    hook = None
    if engine.is_first_stage():  # an inf in one stage's gradients only
        hook = engine.module.tied_modules["embed"].wte.weight.register_hook(lambda g: g * float("inf"))
    loss = train(engine, 1, first=1)[0]
    if hook is not None:
        hook.remove()
    unchanged = all(torch.equal(p, params_before[n]) for n, p in engine.module.named_parameters())
    after = (engine.skipped_steps, engine.loss_scale(), unchanged, engine.global_steps)
    train(engine, 1, first=2)
    moved = not all(torch.equal(p, params_before[n]) for n, p in engine.module.named_parameters())
    everyone = [None] * world
    dist.all_gather_object(everyone, (before_scale, after, moved, loss))
    return everyone


def test_fp16_overflow_on_one_stage_skips_the_step_on_every_stage():
    for before_scale, (skipped, scale, unchanged, steps), moved, loss in run_world(3, _overflow_on_first_stage):
        assert skipped == 1 and steps == 2
        assert scale == before_scale / 2
        assert unchanged and moved
        assert loss == loss  # the loss itself was finite


# --- checkpoints ------------------------------------------------------------------------------------------


def _save_then_continue(rank, world, save_dir, stages):
    engine = make_engine(pm.pipeline_model(num_stages=stages), config("fp32", 1))
    train(engine, 2)
    engine.save_checkpoint(save_dir, tag="t")
    return train(engine, 2, first=2)


def _load_and_continue(rank, world, save_dir, stages):
    dp = world // stages  # the same global batch: fewer micro-batches per data-parallel rank
    engine = make_engine(pm.pipeline_model(num_stages=stages),
                         config("fp32", 1, gradient_accumulation_steps=ACCUM // dp))
    path, client = engine.load_checkpoint(save_dir)
    assert path is not None and engine.global_steps == 2
    return train(engine, 2, first=2)


@pytest.fixture(scope="module")
def saved_at_four_stages(tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("pipe_ckpt"))
    return save_dir, run_world(4, _save_then_continue, save_dir, 4)


@pytest.mark.parametrize("world,stages", [(2, 2), (1, 1), (4, 2)])
def test_checkpoint_from_four_stages_resumes_at_other_stage_counts(saved_at_four_stages, world, stages):
    save_dir, expected = saved_at_four_stages
    assert run_world(world, _load_and_continue, save_dir, stages) == pytest.approx(expected, rel=1e-5)


def test_pipeline_checkpoint_is_per_layer_and_consolidates_to_the_plain_model(saved_at_four_stages):
    save_dir, _ = saved_at_four_stages
    import os
    files = sorted(os.listdir(os.path.join(save_dir, "t")))
    assert [f for f in files if f.startswith("layer_")] == [f"layer_{i:02d}-model_states.pt" for i in range(6)]
    state = to_fp32_state_dict(save_dir)
    model = pm.Reference()
    names = model.pipeline_names()
    model.load_state_dict({n: state[names[n]] for n in names}, strict=True)
    # The consolidated model's loss on the next batch is the pipeline's loss there before it stepped.
    _, expected = saved_at_four_stages
    assert model(*pm.batch(2, MICRO * ACCUM)).item() == pytest.approx(expected[0], rel=1e-5)


# --- evaluation and failures --------------------------------------------------------------------------------


def _evaluate(rank, world):
    engine = make_engine(pm.pipeline_model(num_stages=world), config("fp32", 0))
    losses = [engine.eval_batch(micro_batches(s, 1, 0)).item() for s in range(2)]
    again = engine.eval_batch(iter([pm.batch(5, 3)]), num_micro_batches=1).item()  # another batch shape
    return losses, again


def test_eval_batch_is_the_mean_loss_of_the_untrained_model():
    losses, again = run_world(3, _evaluate)
    model = pm.Reference()
    with torch.no_grad():
        expected = [sum(model(t, y).item() for t, y in micro_batches(s, 1, 0)) / ACCUM for s in range(2)]
        assert again == pytest.approx(model(*pm.batch(5, 3)).item(), rel=1e-5)
    assert losses == pytest.approx(expected, rel=1e-5)


class Failing(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("injected failure in the last stage")


def _failing_stage(rank, world):
    specs = pm.layer_specs(tied=False)
    specs.insert(len(specs) - 1, Failing())  # a layer of the last stage that raises
    from zerofuse.pipe import PipelineModule
    model = PipelineModule(specs, num_stages=2, loss_fn=pm.loss_fn, partition_method="uniform")
    engine = make_engine(model, config("fp32", 0, pipeline={"timeout": 3}))
    try:
        train(engine, 1)
    except (PipelineError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_failing_stage_brings_its_neighbour_down_with_an_error():
    # Rank 1 raises in its forward; rank 0 (returned here) waits for gradients
    # that never come and must raise, naming the stage, instead of hanging.
    neighbour, failed = run_world_unsynchronised(2, _failing_stage)
    assert failed == "RuntimeError: injected failure in the last stage"
    assert neighbour.startswith("PipelineError") and "gradients of micro-batch 0" in neighbour
    assert "global rank 1" in neighbour and "within 3 s" in neighbour


def _misuse(rank, world):
    engine = make_engine(pm.pipeline_model(num_stages=2), config("fp32", 1))
    errors = []
    for call in (lambda: engine(torch.zeros(1)), lambda: engine.backward(None), lambda: engine.step()):
        try:
            call()
        except PipelineError as e:
            errors.append(str(e))
    try:
        make_engine(pm.pipeline_model(num_stages=2), config("fp32", 3))
    except PipelineError as e:
        errors.append(str(e))
    try:
        make_engine(pm.pipeline_model(num_stages=2), config("fp32", 2))
    except PipelineError as e:
        errors.append(str(e))
    return errors


def test_data_parallel_calls_and_unsupported_stages_are_refused_clearly():
    errors = run_world(2, _misuse)
    assert len(errors) == 5
    assert all("train_batch()" in e for e in errors[:3])
    assert "ZeRO stage 3" in errors[3] and "ZeRO stage 2" in errors[4] and "embed" in errors[4]


def _monitored(rank, world, out_dir):
    cfg = config("fp32", 1, steps_per_print=2, csv_monitor={"enabled": True, "output_path": out_dir, "job_name": "p"})
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        engine, *_ = zerofuse.initialize(model=pm.pipeline_model(num_stages=world), config=cfg)
        train(engine, 2)
    return printed.getvalue(), engine.last_bubble_fraction, engine.expected_bubble_fraction()


def test_bubble_fraction_is_measured_reported_and_monitored(tmp_path):
    import csv
    printed, bubble, ideal = run_world(2, _monitored, str(tmp_path))
    assert ideal == pytest.approx(1 / 5)  # 2 stages, 4 micro-batches
    assert 0 < bubble < 1  # stage 0 waits at least for the last micro-batch's gradients
    assert "pipeline bubble" in printed and "(ideal 20.0%)" in printed
    assert "2 pipeline stages x 1 data-parallel" in printed
    with open(tmp_path / "p" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(0 < float(r["pipeline_bubble"]) < 1 for r in rows)


# --- tuple activations, the whole-model save ----------------------------------------------------------------


class First(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 7)

    def forward(self, x):  # a float activation with gradients and an integer one without
        return self.lin(x), torch.arange(x.shape[0]) % 3


class Middle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(7, 7)

    def forward(self, inputs):
        h, group = inputs
        return torch.tanh(self.lin(h)) * (1 + group[:, None]), group


class Last(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(7, 3)

    def forward(self, inputs):
        return self.lin(inputs[0])


def tuple_layers():
    from zerofuse.pipe import LayerSpec
    return [LayerSpec(First), LayerSpec(Middle), LayerSpec(Middle), LayerSpec(Last)]


def tuple_batches(step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(3, 5, generator=g), torch.randn(3, 3, generator=g)) for _ in range(ACCUM)]


def _tuple_pipeline(rank, world, save_dir):
    from zerofuse.pipe import PipelineModule
    model = PipelineModule(tuple_layers(), num_stages=2, loss_fn=torch.nn.functional.mse_loss, seed_layers=True,
                           partition_method="uniform")
    engine = make_engine(model, config("fp32", 0))
    losses = [engine.train_batch(iter(tuple_batches(s))).item() for s in range(STEPS)]
    engine.save_16bit_model(save_dir, "whole.pt")
    return losses


def test_tuple_activations_and_the_whole_model_save(tmp_path):
    losses = run_world(2, _tuple_pipeline, str(tmp_path))
    layers = []
    for idx, spec in enumerate(tuple_layers()):
        torch.manual_seed(1234 + idx)  # PipelineModule's default base_seed
        layers.append(spec.build())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.99))
    expected = []
    for step in range(STEPS):
        opt.zero_grad()
        total = sum(torch.nn.functional.mse_loss(model(x), y) for x, y in tuple_batches(step)) / ACCUM
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        expected.append(total.item())
    assert losses == pytest.approx(expected, rel=1e-5)
    saved = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert list(saved) == list(model.state_dict())  # "0.lin.weight", ... in layer order, from both stages
    for key, value in model.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-5, msg=key)
