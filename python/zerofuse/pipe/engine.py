"""The pipeline engine: DeepSpeed's PipelineEngine API on zerofuse's engine.

Each rank is one stage of one data-parallel replica of the pipeline. The
engine underneath is the data-parallel Engine over this stage's layers and
the stage's data-parallel group (ZeRO-0/1, or ZeRO-2 when no weight is tied
across stages), so mixed precision, loss scaling, clipping, optimizers,
schedules and checkpoint pieces are the same code. What a pipeline adds:

  train_batch()  gradient_accumulation_steps micro-batches through the 1F1B
                 schedule (schedule.py), activations and gradients exchanged
                 with the neighbouring stages (p2p.py);
  tied weights   a module shared by several stages (TiedLayerSpec) has its
                 gradients summed between the owners before the step;
  the step       gradient statistics summed over every stage, so the
                 inf/NaN skip, the loss scale and the clipping norm are
                 the same on all of them (a tied weight counted once);
  the loss       averaged over micro-batches and data-parallel ranks on the
                 last stage, then given to every stage.
"""
import time

import torch
import torch.distributed as dist

from ..runtime.engine import Engine, _cast_inputs, _loss_of
from .module import PipelineError, PipelineModule
from .p2p import StageLink, as_tuple
from .schedule import FORWARD, eval_schedule, ideal_bubble_fraction, train_schedule


class PipelineEngine(Engine):
    _PIPELINE = True
    _EXTRA_METRICS = ("pipeline_bubble",)

    def __init__(self, model, config, model_parameters=None, optimizer=None, lr_scheduler=None,
                 training_data=None, process_group=None, collate_fn=None, mpu=None):
        """Engine's arguments; the PipelineModule's grid is the mpu (its data-
        parallel group, and a tensor-parallel group when stages are split
        further); process_group and mpu are not used."""
        if not isinstance(model, PipelineModule):
            raise TypeError(f"PipelineEngine: 'model' must be a PipelineModule, got {type(model).__name__}")
        grid = model.mpu()
        self.grid = grid  # before Engine.__init__, whose reports ask who reports
        super().__init__(model, config, model_parameters, optimizer, lr_scheduler, training_data, None, collate_fn,
                         mpu=grid)
        c = self._config
        if c.zero.stage == 3:
            raise PipelineError("ZeRO stage 3 cannot be combined with pipeline parallelism (nor can it in "
                                "DeepSpeed); use stage 0, 1 or 2")
        if c.zero.stage == 2 and model.tied_comms:
            raise PipelineError(f"ZeRO stage 2 cannot be combined with weights tied across pipeline stages "
                                f"(keys {sorted(model.tied_comms)}): their gradients are summed between stages "
                                "before the data-parallel reduction, which stage 2 does during backward; use "
                                "ZeRO stage 0 or 1")
        self.num_stages = model.num_stages
        self.stage_id = grid.stage_id
        self.micro_batches = c.gradient_accumulation_steps
        self.micro_batch_size = c.train_micro_batch_size_per_gpu
        self.link = StageLink(grid, self.device, c.pipeline_timeout, model.dynamic_shape)
        if self.num_stages > 1:
            self.optimizer.extra_stat_groups.append(grid.get_pipe_parallel_group())
        # A tied weight counts in the gradient statistics on its primary stage only (the
        # engine already did the same for tensor-parallel replicas, through the mpu).
        not_primary = model.tied_parameters_not_primary()
        if not_primary:
            self.optimizer.exclude_from_norm(not_primary)
        self._tied_slices = self._tied_gradient_slices(model)
        self.data_iterator = None
        self.last_bubble_fraction = None
        if self._reports:
            print("[zerofuse] pipeline: " + model.balance_report().replace("\n", "\n[zerofuse] pipeline: "),
                  flush=True)

    # --- who this rank is -----------------------------------------------------------------------------

    @property
    def _reports(self) -> bool:
        return self.grid.global_rank == 0

    def _describe_world(self) -> str:
        g = self.grid
        tensor = f" x {g.model_parallel_size} tensor-parallel" if g.model_parallel_size > 1 else ""
        return (f"world size {g.world_size} ({g.pipe_parallel_size} pipeline stages x {g.data_parallel_size} "
                f"data-parallel{tensor})")

    @property
    def global_rank(self) -> int:
        return self.grid.global_rank

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def set_dataiterator(self, iterator):
        """The iterator train_batch()/eval_batch() draw from when not given one (first and last stages)."""
        self.data_iterator = iterator

    def expected_bubble_fraction(self) -> float:
        return ideal_bubble_fraction(self.num_stages, self.micro_batches)

    def _step_metrics(self) -> dict:
        return dict(super()._step_metrics(), pipeline_bubble=self.last_bubble_fraction)

    def _report_extra(self) -> str:
        if self.last_bubble_fraction is None:
            return ""
        return (f", pipeline bubble {self.last_bubble_fraction:.1%} on stage {self.stage_id} "
                f"(ideal {self.expected_bubble_fraction():.1%})")

    # --- what the pipeline does not offer ---------------------------------------------------------------

    def forward(self, *args, **kwargs):
        raise PipelineError("Only train_batch() and eval_batch() are accessible in pipeline mode (as in DeepSpeed)")

    def backward(self, *args, **kwargs):
        raise PipelineError("Only train_batch() and eval_batch() are accessible in pipeline mode (as in DeepSpeed)")

    def step(self, *args, **kwargs):
        raise PipelineError("Only train_batch() and eval_batch() are accessible in pipeline mode (as in DeepSpeed)")

    def no_sync(self):
        raise PipelineError("engine.no_sync() is not available in pipeline mode; train_batch() accumulates the "
                            "micro-batches itself")

    # --- training ----------------------------------------------------------------------------------------

    def train_batch(self, data_iter=None):
        """One optimizer step over gradient_accumulation_steps micro-batches
        (from data_iter on the first and last stages: each item is (inputs,
        labels)); returns the mean loss over micro-batches and data-parallel
        ranks, on every stage."""
        if not torch.is_grad_enabled():
            raise PipelineError("train_batch() requires gradients enabled; use eval_batch() instead")
        data_iter = self._data_source(data_iter, "train_batch")
        self.module.train()
        m, reducer = self.micro_batches, self.optimizer.reducer
        self.link.new_batch()
        start, waited = time.perf_counter(), self.link.wait_seconds
        received, sent, losses = {}, {}, []
        for kind, i in train_schedule(self.stage_id, self.num_stages, m):
            if kind == FORWARD:
                received[i], sent[i] = self._forward_micro(data_iter, i, losses, training=True)
                if not self.is_last_stage():
                    self.link.send_activations(sent[i], i)
                continue
            # Gradients accumulate locally; the data-parallel reduction waits
            # for the tied-weight sums (ZeRO-0/1) after the last micro-batch.
            reducer.begin_backward(boundary=False, first_in_window=i == 0)
            try:
                if self.is_last_stage():
                    self.scaled_loss(sent.pop(i)).backward()
                else:
                    out = sent.pop(i)
                    outputs = [t for t in as_tuple(out) if t.requires_grad and t.is_floating_point()]
                    grads = self.link.recv_grads(out, i)
                    torch.autograd.backward(outputs, grads)
            finally:
                reducer.end_backward()
            if not self.is_first_stage():
                self.link.send_grads(received.pop(i), i)
            self.progress.count_micro_step(m, boundary=i == m - 1)
        self.link.finish_sends()
        elapsed = time.perf_counter() - start
        self.last_bubble_fraction = (self.link.wait_seconds - waited) / elapsed if elapsed > 0 else 0.0

        self._reduce_tied_gradients()
        if self.optimizer.stage < 2:
            reducer.begin_backward(boundary=True, first_in_window=False)
            reducer.end_backward()  # no backward runs: every bucket is complete and is reduced now
        loss = self._aggregate_loss(losses)
        self._last_loss = loss
        self._optimizer_step()
        return loss

    def eval_batch(self, data_iter=None, return_logits=False, compute_loss=True, reduce_output="avg",
                   bcast_loss=True, num_micro_batches=None):
        """Forward passes over num_micro_batches (default gradient_accumulation_steps)
        micro-batches; returns the mean loss (reduce_output="avg") over them and
        the data-parallel ranks, on every stage when bcast_loss; with
        return_logits, (loss, last micro-batch's outputs on the last stage)."""
        if reduce_output not in ("avg", None):
            raise ValueError(f"eval_batch: 'reduce_output' must be 'avg' or None, got {reduce_output!r}")
        m = self.micro_batches if num_micro_batches is None else int(num_micro_batches)
        if m < 1:
            raise ValueError(f"eval_batch: 'num_micro_batches' must be >= 1, got {num_micro_batches!r}")
        data_iter = self._data_source(data_iter, "eval_batch")
        self.module.eval()
        self.link.new_batch()
        outputs, losses = None, []
        try:
            with torch.no_grad():
                for _, i in eval_schedule(self.stage_id, self.num_stages, m):
                    _, out = self._forward_micro(data_iter, i, losses, training=False, compute_loss=compute_loss)
                    if self.is_last_stage():
                        outputs = out
                    else:
                        self.link.send_activations(out, i)
            self.link.finish_sends()
        finally:
            self.module.train()
        if not compute_loss:
            result = None
        elif reduce_output is None:
            result = losses if self.is_last_stage() else None
        else:
            result = self._aggregate_loss(losses, broadcast=bcast_loss)
        return (result, outputs) if return_logits else result

    # --- parts of a step ---------------------------------------------------------------------------------

    def _data_source(self, data_iter, caller):
        if data_iter is not None:
            return data_iter
        if self.data_iterator is not None:
            return self.data_iterator
        if self.training_dataloader is not None:
            from ..runtime.dataloader import RepeatingLoader
            self.data_iterator = RepeatingLoader(self.training_dataloader)
            return self.data_iterator
        if self.is_first_stage() or self.is_last_stage():
            raise ValueError(f"engine.{caller}: the first and last stages need data: give data_iter, "
                             "set_dataiterator(), or training_data to initialize()")
        return None

    def _forward_micro(self, data_iter, i, losses, training, compute_loss=True):
        """(what this stage received, what it produced) for micro-batch i; the
        last stage produces the loss (or the outputs without a loss)."""
        batch = None
        if self.is_first_stage() or self.is_last_stage():
            batch = next(data_iter)
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                size = f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""
                raise PipelineError(f"each item of a pipeline's data iterator must be (inputs, labels), got "
                                    f"{type(batch).__name__}{size}")
        if self.is_first_stage():
            received = batch[0] if not isinstance(batch[0], list) else tuple(batch[0])
        else:
            received = self.link.recv_activations(i)
        out = self._run_module(received)
        if not self.is_last_stage() or not compute_loss:
            return received, out
        loss_fn = self.module.loss_fn
        labels = _cast_inputs(batch[1], self.model_dtype, self.device)
        loss = _loss_of(loss_fn(out, labels) if loss_fn is not None else out)
        if loss.numel() != 1:
            raise PipelineError(f"the pipeline's loss must be a single value, got shape {tuple(loss.shape)} "
                                "(give PipelineModule a loss_fn that reduces)")
        losses.append(loss.detach().float())
        return received, (loss if training else out)

    def _tied_gradient_slices(self, model):
        """(flat gradient slice, group) of each parameter tied across stages."""
        out = []
        if not model.tied_comms:
            return out
        slot_of = {id(slot.param): slot for slot in self.optimizer.layout.slots}
        for weight, group in model.get_tied_weights_and_groups():
            slot = slot_of.get(id(weight))
            if slot is not None:  # a frozen tied weight has no gradient
                out.append((slice(slot.offset, slot.offset + slot.numel), group))
        return out

    def _reduce_tied_gradients(self):
        """Sum each tied weight's accumulated gradient over the stages that share it."""
        grads = self.optimizer.flat_grads
        for flat, group in self._tied_slices:
            piece = grads[flat]
            dist.all_reduce(piece, op=dist.ReduceOp.SUM, group=group)

    def _aggregate_loss(self, losses, broadcast=True):
        """The last stage's mean loss, averaged over data-parallel ranks, then
        given to every stage (when broadcast)."""
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.is_last_stage():
            loss = torch.stack(losses).mean()
            dp = self.grid.get_data_parallel_group()
            if dp is not None and self.grid.data_parallel_size > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp)
        if broadcast and self.num_stages > 1:
            last = self.grid.stage_to_global(self.num_stages - 1)
            dist.broadcast(loss, src=last, group=self.grid.get_pipe_parallel_group())
        return loss

    # --- checkpoints ----------------------------------------------------------------------------------------

    def whole_model_state(self, exclude_frozen_parameters=False):
        """Every stage's layers, under the whole model's names, sent to global
        rank 0 (None elsewhere); a tied module once. Every rank must call it."""
        frozen = {id(p) for p in self.module.parameters() if not p.requires_grad} \
            if exclude_frozen_parameters else set()
        from ..tp.checkpoint import whole_state
        mine = {}
        if self.grid.data_parallel_id == 0:  # tensor-parallel slices gathered whole within the stage
            for _, prefix, layer in self.module.layer_modules():
                state = whole_state(layer.state_dict(keep_vars=True), self.tp, frozen)
                if self.tp is None or self.tp.rank == 0:
                    mine.update((prefix + k, v) for k, v in state.items())
        if not dist.is_initialized():
            return mine
        everyone = [None] * self.grid.world_size if self.grid.global_rank == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if everyone is None:
            return None
        out = {}
        for part in everyone:
            out.update(part)
        return out

    @property
    def holds_part_of_model(self) -> bool:
        return self.num_stages > 1

    @property
    def _file_rank(self) -> int:
        return self.grid.global_rank

    def _checkpoint_barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False):
        from .checkpoint import save_pipeline_checkpoint
        save_pipeline_checkpoint(self, save_dir, tag, {} if client_state is None else client_state, save_latest,
                                 exclude_frozen_parameters)
        return True

