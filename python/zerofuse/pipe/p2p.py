"""Activations forward and their gradients backward between neighbouring
stages, by point-to-point messages over torch.distributed (gloo on the CPU,
NCCL on GPUs).

The receiver must post a buffer of the right shape and dtype, so the first
message of every train_batch/eval_batch in each direction is preceded by a
description of what follows (how many tensors, their dtypes, shapes and
whether they carry gradients); the rest of that batch reuses it, and a
micro-batch whose activations differ from it is an error on the sending
side (unless the module was built with dynamic_shape=True, which describes
every message). Gradients need no description: they have the shapes of the
activations they belong to.

Sends are non-blocking (waited for at the end of the batch); receives block,
each with a timeout, so a stage that failed brings its neighbours down with
an error naming it instead of hanging them.
"""
import datetime
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .module import PipelineError

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_CODE = {d: i for i, d in enumerate(_DTYPES)}


def as_tuple(x) -> Tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def describe(x) -> List[int]:
    """[is_tuple, count, then per tensor: dtype code, requires_grad, ndim, *shape]."""
    tensors = as_tuple(x)
    out = [int(isinstance(x, tuple)), len(tensors)]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise PipelineError(f"a pipeline stage must output a tensor or a tuple of tensors; got a "
                                f"{type(t).__name__} among its outputs")
        if t.dtype not in _CODE:
            raise PipelineError(f"a pipeline stage output has dtype {t.dtype}, which cannot be sent between stages")
        out += [_CODE[t.dtype], int(t.requires_grad and t.is_floating_point()), t.dim(), *t.shape]
    return out


def _parse(desc: Sequence[int]):
    is_tuple, count = bool(desc[0]), desc[1]
    specs, i = [], 2
    for _ in range(count):
        dtype, grad, ndim = _DTYPES[desc[i]], bool(desc[i + 1]), desc[i + 2]
        specs.append((dtype, grad, tuple(desc[i + 3:i + 3 + ndim])))
        i += 3 + ndim
    return is_tuple, specs


class StageLink:
    """This stage's messages to and from its neighbours (same data-parallel coordinate)."""

    def __init__(self, grid, device: torch.device, timeout_s: float, dynamic_shape: bool = False):
        self.stage = grid.stage_id
        ranks = grid.pipe_ranks  # global rank of each stage, this rank's data/model coordinates
        self.prev = ranks[self.stage - 1] if self.stage > 0 else None
        self.next = ranks[self.stage + 1] if self.stage + 1 < len(ranks) else None
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.dynamic = dynamic_shape
        self.pending = []      # (work, tensor) of sends not yet known complete
        self.wait_seconds = 0.0  # time blocked in receives: the stage's idle time
        self.new_batch()

    def new_batch(self):
        """A train_batch/eval_batch begins: the next message each way is described again."""
        self._sent_desc: Optional[List[int]] = None
        self._recv_desc = None

    # --- waiting ---------------------------------------------------------------------------------------

    def _wait(self, work, what: str, peer: int):
        start = time.perf_counter()
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as e:
            raise PipelineError(f"pipeline stage {self.stage}: no {what} from global rank {peer} within "
                                f"{self.timeout.total_seconds():g} s (that stage failed or is stuck; "
                                f"the pipeline 'timeout' config key sets this): {e}") from None
        self.wait_seconds += time.perf_counter() - start

    def _recv(self, tensor, peer: int, what: str):
        self._wait(dist.irecv(tensor, src=peer), what, peer)
        return tensor

    def _send(self, tensor, peer: int):
        tensor = tensor.contiguous()
        self.pending.append((dist.isend(tensor, dst=peer), tensor))

    def finish_sends(self):
        """Wait until every message sent has been taken (end of a batch)."""
        pending, self.pending = self.pending, []
        for work, _ in pending:
            work.wait(timeout=self.timeout)

    # --- activations --------------------------------------------------------------------------------------

    def send_activations(self, x, micro_batch: int):
        desc = describe(x)
        if self._sent_desc is None or self.dynamic:
            # On the stage's device: NCCL sends device tensors only (gloo takes either).
            self._send(torch.tensor([len(desc)], dtype=torch.int64, device=self.device), self.next)
            self._send(torch.tensor(desc, dtype=torch.int64, device=self.device), self.next)
            self._sent_desc = desc
        elif desc != self._sent_desc:
            raise PipelineError(f"pipeline stage {self.stage}: micro-batch {micro_batch}'s activations "
                                f"{_parse(desc)[1]} differ from the first micro-batch's "
                                f"{_parse(self._sent_desc)[1]}; build the PipelineModule with dynamic_shape=True "
                                "for varying shapes")
        for t in as_tuple(x):
            self._send(t.detach(), self.next)

    def recv_activations(self, micro_batch: int):
        """The previous stage's output for micro_batch; floating tensors that
        carried gradients there require them here (their .grad goes back)."""
        what = f"activations of micro-batch {micro_batch}"
        if self._recv_desc is None or self.dynamic:
            length = self._recv(torch.zeros(1, dtype=torch.int64, device=self.device), self.prev, what)
            header = self._recv(torch.zeros(int(length), dtype=torch.int64, device=self.device), self.prev, what)
            self._recv_desc = _parse(header.tolist())
        is_tuple, specs = self._recv_desc
        out = []
        for dtype, grad, shape in specs:
            t = self._recv(torch.empty(shape, dtype=dtype, device=self.device), self.prev, what)
            out.append(t.requires_grad_(grad))
        return tuple(out) if is_tuple else out[0]

    # --- gradients ------------------------------------------------------------------------------------------

    def send_grads(self, received, micro_batch: int):
        """The gradients of the activations this stage received for micro_batch
        (zeros for one backward did not reach)."""
        for t in as_tuple(received):
            if t.requires_grad:
                self._send(t.grad if t.grad is not None else torch.zeros_like(t), self.prev)

    def recv_grads(self, sent, micro_batch: int) -> List[torch.Tensor]:
        """Gradients for the activations this stage sent for micro_batch (those that carry gradients)."""
        what = f"gradients of micro-batch {micro_batch}"
        return [self._recv(torch.empty_like(t), self.next, what) for t in as_tuple(sent)
                if t.requires_grad and t.is_floating_point()]
