"""Pipeline pieces that need no second process: the 1F1B schedule (simulated),
partitioning, process topologies, and PipelineModule on one stage."""
import itertools
import random

import pytest
import torch

import pipe_models as pm
from zerofuse.pipe import (LayerSpec, PipeDataParallelTopology, PipelineModule, PipeModelDataParallelTopology,
                           ProcessTopology, ideal_bubble_fraction, train_schedule)
from zerofuse.pipe.partition import partition_balanced, partition_layers, partition_uniform


# --- the schedule -----------------------------------------------------------------------------------------


def simulate(p, m, forward_cost=1.0, backward_cost=1.0):
    """Run every stage's schedule as a discrete-event simulation in which an
    instruction starts when its inputs exist (activations from the previous
    stage, gradients from the next) and the stage is free. Returns (makespan,
    per-stage busy time, the most activations each stage held at once)."""
    programs = [list(train_schedule(s, p, m)) for s in range(p)]
    done = {}  # (kind, stage, micro) -> finish time
    clock, pc, busy, alive, peak = [0.0] * p, [0] * p, [0.0] * p, [0] * p, [0] * p
    progress = True
    while progress:
        progress = False
        for s in range(p):
            while pc[s] < len(programs[s]):
                kind, i = programs[s][pc[s]]
                need = ("forward", s - 1, i) if kind == "forward" and s > 0 else \
                    ("backward", s + 1, i) if kind == "backward" and s < p - 1 else \
                    ("forward", s, i) if kind == "backward" else None
                if need is not None and need not in done:
                    break
                start = max(clock[s], done.get(need, 0.0))
                cost = forward_cost if kind == "forward" else backward_cost
                clock[s] = done[(kind, s, i)] = start + cost
                busy[s] += cost
                alive[s] += 1 if kind == "forward" else -1
                peak[s] = max(peak[s], alive[s])
                pc[s] += 1
                progress = True
    assert all(pc[s] == len(programs[s]) for s in range(p)), "the schedule deadlocks"
    return max(clock), busy, peak


@pytest.mark.parametrize("p,m", [(1, 1), (1, 4), (2, 1), (2, 3), (3, 5), (4, 4), (4, 9), (5, 2)])
def test_1f1b_runs_each_micro_batch_once_without_deadlock_and_idles_as_the_formula(p, m):
    for s in range(p):
        prog = train_schedule(s, p, m)
        assert sorted(i for k, i in prog if k == "forward") == list(range(m))
        assert sorted(i for k, i in prog if k == "backward") == list(range(m))
    makespan, busy, peak = simulate(p, m)
    idle = 1 - sum(busy) / (p * makespan)
    assert idle == pytest.approx(ideal_bubble_fraction(p, m), abs=1e-12)
    # 1F1B's memory bound: stage s holds at most p - s micro-batches' activations (GPipe: m).
    assert all(peak[s] <= min(p - s, m) for s in range(p))


def test_1f1b_idle_time_with_backward_twice_forward():
    # Unequal forward/backward costs leave the bubble's share at (p-1)/(m+p-1).
    makespan, busy, _ = simulate(4, 8, 1.0, 2.0)
    assert 1 - sum(busy) / (4 * makespan) == pytest.approx(3 / 11)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stage 2"):
        train_schedule(2, 2, 4)
    with pytest.raises(ValueError, match="micro_batches"):
        train_schedule(0, 2, 0)


# --- partitioning -----------------------------------------------------------------------------------------


def brute_force_bottleneck(weights, parts):
    n, best = len(weights), float("inf")
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balanced_partition_minimises_the_heaviest_stage(seed):
    rng = random.Random(seed)
    n, parts = rng.randint(3, 9), rng.randint(2, 3)
    weights = [rng.choice([0, 1, 7, 100, 1000, 4096]) for _ in range(n)]
    bounds = partition_balanced(weights, parts)
    assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == parts + 1
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    heaviest = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert heaviest == brute_force_bottleneck(weights, parts)


def test_uniform_and_type_partitions():
    assert partition_uniform(7, 3) == [0, 3, 5, 7]
    assert partition_uniform(2, 4) == [0, 1, 2, 2, 2]
    layers = [LayerSpec(pm.Embeddings), *[LayerSpec(pm.Block) for _ in range(5)], LayerSpec(pm.FinalNorm)]
    bounds = partition_layers("type:block", layers, 2, [0] * len(layers))
    blocks = [sum(1 for i in range(a, b) if layers[i].typename is pm.Block) for a, b in zip(bounds, bounds[1:])]
    assert sorted(blocks) == [2, 3]
    with pytest.raises(ValueError, match="matches no layer"):
        partition_layers("type:Conv", layers, 2, [0] * len(layers))
    with pytest.raises(ValueError, match="partition_method"):
        partition_layers("profile", layers, 2, [0] * len(layers))


# --- topologies -------------------------------------------------------------------------------------------


def test_topology_ranks_follow_deepspeed_order():
    topo = PipeDataParallelTopology(num_pp=2, num_dp=3)
    assert [topo.get_rank(pipe=p, data=d) for p in range(2) for d in range(3)] == list(range(6))
    assert topo.get_coord(4) == topo.ProcessCoord(pipe=1, data=1)
    assert topo.get_axis_comm_lists("pipe") == [[0, 3], [1, 4], [2, 5]]
    assert topo.get_axis_comm_lists("data") == [[0, 1, 2], [3, 4, 5]]
    assert topo.filter_match(pipe=1) == [3, 4, 5]
    assert topo.get_dim("model") == 0
    three = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
    assert three.get_axis_names() == ["pipe", "data", "model"] and three.world_size() == 4
    assert three.get_rank_repr(3) == "model_01"
    with pytest.raises(ValueError, match="axes"):
        ProcessTopology(["pipe", "pipe"], [1, 2])
    with pytest.raises(ValueError, match="outside"):
        topo.get_rank(pipe=2, data=0)


# --- one stage --------------------------------------------------------------------------------------------


def test_one_stage_pipeline_module_is_the_whole_model():
    model = pm.pipeline_model(num_stages=1)
    reference = pm.Reference()
    names = reference.pipeline_names()
    mine = dict(model.named_parameters())
    assert sorted(names.values()) == sorted(mine)
    for ref_name, p in reference.named_parameters():
        assert torch.equal(mine[names[ref_name]], p), ref_name
    tokens, targets = pm.batch(0, 3)
    assert torch.equal(model.loss_fn(model(tokens), targets), reference(tokens, targets))
    assert "stage 0: layers [0, 7)" in model.balance_report()


def test_pipeline_module_argument_errors():
    with pytest.raises(ValueError, match="num_stages"):
        PipelineModule([LayerSpec(pm.FinalNorm)])
    with pytest.raises(ValueError, match="must divide the world size"):
        PipelineModule([LayerSpec(pm.FinalNorm)], num_stages=2)
    with pytest.raises(TypeError, match="torch.nn.Module class"):
        LayerSpec(torch.relu)
    with pytest.raises(ValueError, match="activation_checkpoint_interval"):
        PipelineModule([LayerSpec(pm.FinalNorm)], num_stages=1, activation_checkpoint_interval=-1)
    with pytest.raises(TypeError, match="layer 1"):
        PipelineModule([LayerSpec(pm.FinalNorm), 3], num_stages=1)
