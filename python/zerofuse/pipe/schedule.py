"""The order in which a stage runs its micro-batches.

1F1B (one forward, one backward; PipeDream-Flush, DeepSpeed's TrainSchedule):
stage s of p runs min(p - s - 1, m) forwards to fill the pipeline, then
alternates one forward and one backward, then drains the remaining
backwards. At most p - s micro-batches' activations are alive on stage s
(GPipe keeps all m), and the idle fraction with equal-cost stages is
(p - 1) / (m + p - 1), the same as GPipe's.

Each instruction is (kind, micro_batch); the engine turns a forward into
receive-activations / forward / send-activations and a backward into
receive-gradients / backward / send-gradients, with the sends non-blocking.
The receives are the only waits, and the order below never waits in a cycle.
"""
from typing import List, NamedTuple

FORWARD = "forward"
BACKWARD = "backward"


class Instruction(NamedTuple):
    kind: str
    micro_batch: int


def train_schedule(stage: int, num_stages: int, micro_batches: int) -> List[Instruction]:
    if not 0 <= stage < num_stages:
        raise ValueError(f"train_schedule: stage {stage} is outside 0..{num_stages - 1}")
    if micro_batches < 1:
        raise ValueError(f"train_schedule: micro_batches must be >= 1, got {micro_batches}")
    warmup = min(num_stages - stage - 1, micro_batches)
    out = [Instruction(FORWARD, i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        out.append(Instruction(FORWARD, warmup + i))
        out.append(Instruction(BACKWARD, i))
    out.extend(Instruction(BACKWARD, i) for i in range(micro_batches - warmup, micro_batches))
    return out


def eval_schedule(stage: int, num_stages: int, micro_batches: int) -> List[Instruction]:
    return [Instruction(FORWARD, i) for i in range(micro_batches)]


def ideal_bubble_fraction(num_stages: int, micro_batches: int) -> float:
    """The idle share of a step when every stage's forward and backward take equal time."""
    return (num_stages - 1) / (micro_batches + num_stages - 1)
