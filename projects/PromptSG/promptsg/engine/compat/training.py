"""FastReID's trainers: AMP where it runs, and a loss log that reads only what the GPU wrote."""
import logging
import time

import torch

from .patch import _patch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# 8b. AMPTrainer asserts CUDA (and only knows fp16 + GradScaler)
# --------------------------------------------------------------------------------------------
@_patch
def _amp_where_it_runs():
    """SOLVER.AMP.ENABLED trains with autocast on CUDA (bf16 where supported, else fp16 with a
    GradScaler) and falls back to fp32 with a warning where there is no CUDA."""
    import fastreid.engine.defaults as defaults
    from fastreid.engine.train_loop import SimpleTrainer

    if getattr(defaults.AMPTrainer, "_promptsg_patched", False):
        return

    class AMPTrainer(SimpleTrainer):
        _promptsg_patched = True

        def __init__(self, model, data_loader, optimizer, param_wrapper, grad_scaler=None):
            super().__init__(model, data_loader, optimizer, param_wrapper)
            self.dtype = None
            if not torch.cuda.is_available():
                logger.warning("SOLVER.AMP.ENABLED but CUDA is not available: training in float32.")
            elif torch.cuda.is_bf16_supported():
                self.dtype = torch.bfloat16
            else:
                self.dtype = torch.float16
            use_scaler = self.dtype == torch.float16
            self.grad_scaler = grad_scaler or torch.amp.GradScaler("cuda", enabled=use_scaler)

        def run_step(self):
            if self.dtype is None:
                return super().run_step()
            assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
            t0 = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time = time.perf_counter() - t0
            with torch.autocast("cuda", dtype=self.dtype):
                loss_dict = self.model(data)
                losses = sum(loss_dict.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_scaler.scale(losses).backward()
            self._write_metrics(loss_dict, data_time)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    defaults.AMPTrainer = AMPTrainer


# ============================================================================================
# 12-13. GPU stream races, found by reading FastReID against PyTorch's CUDA
# stream semantics. Streams from PyTorch's pool do not wait for the default stream. FastReID's
# own forward pass used to stop the host (``.item()`` in its accuracy log, ``nonzero()`` in its
# ID loss), which hid both; PromptSG's training step has no such stop, so the host runs ahead of
# the GPU and both races are live. Each has CUDA tests in tests/test_compat.py that keep the GPU
# busy (``torch.cuda._sleep``) while the host reads or frees a tensor: one for the patched code,
# one for FastReID's.
# ============================================================================================

# Devices on which the trainer's loss log waits one step for its values. On the CPU it is written
# at once; tests add "cpu" here to run the waiting path on a machine without a GPU.
DEFERRED_LOSS_LOG_DEVICES = ("cuda",)


# --------------------------------------------------------------------------------------------
# 12. SimpleTrainer._write_metrics reads the losses on a new stream that does not wait for them
# --------------------------------------------------------------------------------------------
@_patch
def _loss_log_reads_written_losses():
    """FastReID copies each loss to the host on a fresh ``torch.cuda.Stream()`` ("so these ops
    don't wait for DDP or backward"). That stream does not wait for the one that computed the
    losses either, so the log can read a loss before the GPU wrote it: a stale value, or garbage
    that trips its NaN check. Here the losses are copied on their own stream without waiting
    (``deferred_log.DeferredLossLog``) and FastReID's ``_write_metrics`` writes them one step
    later, under their own iteration. ``DefaultTrainer.run_step`` writes the last step of each
    epoch at once, so the epoch's checkpoint, evaluation and log lines see every loss (and a NaN
    loss stops training before its epoch is checkpointed). The stop names the first non-finite
    terms and their iteration (``checkpoint.check_finite_losses``), not every term as FastReID's."""
    from fastreid.engine.defaults import DefaultTrainer
    from fastreid.engine.train_loop import SimpleTrainer

    from ..checkpoint import check_finite_losses
    from ...utils.deferred_log import DeferredLossLog

    if getattr(SimpleTrainer._write_metrics, "_promptsg_patched", False):
        return
    fastreid_write = SimpleTrainer._write_metrics
    fastreid_run_step = DefaultTrainer.run_step

    def checked_write(self, loss_dict, data_time):
        check_finite_losses(self.iter, loss_dict)      # names the first non-finite terms
        fastreid_write(self, loss_dict, data_time)

    def _write_metrics(self, loss_dict, data_time):
        if next(iter(loss_dict.values())).device.type not in DEFERRED_LOSS_LOG_DEVICES:
            self.flush_metrics()
            checked_write(self, loss_dict, data_time)          # host values: written at once
            return
        previous, self._pending_losses = (getattr(self, "_pending_losses", None),
                                          DeferredLossLog(self.iter, loss_dict, data_time))
        if previous is not None:
            previous.write(self, checked_write)

    def flush_metrics(self):
        """Write the losses still waiting for the next step, if any."""
        pending, self._pending_losses = getattr(self, "_pending_losses", None), None
        if pending is not None:
            pending.write(self, checked_write)

    def run_step(self):
        fastreid_run_step(self)
        if (self.iter + 1) % self.iters_per_epoch == 0 and hasattr(self._trainer, "flush_metrics"):
            self._trainer.flush_metrics()

    _write_metrics._promptsg_patched = True
    SimpleTrainer._write_metrics = _write_metrics
    SimpleTrainer.flush_metrics = flush_metrics
    SimpleTrainer.fastreid_write_metrics = fastreid_write
    DefaultTrainer.run_step = run_step
