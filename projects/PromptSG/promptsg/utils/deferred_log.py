"""Training logs read from the GPU without stopping the host, and only once the GPU wrote them.

A value on the GPU reaches the host through a copy. Waiting for it at once (``.item()``) stops the
host until the GPU has finished all the work queued before it, so the host can no longer queue
the next step while the GPU runs this one. PromptSG's training step has no such stop.
Its logs therefore use ``HostCopy``: the copy is queued on the stream that computed the value, into
pinned host memory, and the value is read one training step later. By then the copy has long
finished, and waiting for it costs nothing.

  * ``DeferredScalars``: what the model logs in training, the accuracy (``cls_accuracy``) and the
    alignment diagnostics (``diagnostics.py``).
  * ``DeferredLossLog``: the loss dict that FastReID's trainer logs after each step (patched in
    through ``engine/compat/training.py``, section 12). Each value is written under its own iteration.

On the CPU a copy is an ordinary copy. ``DeferredScalars`` then logs at once, and the trainer's
loss log waits only where its values are on a device named in
``compat.training.DEFERRED_LOSS_LOG_DEVICES``.
"""
import contextlib

import torch
from fastreid.utils.events import get_event_storage


class HostCopy:
    """A tensor's values on their way to the host: the copy starts now, ``tolist()`` waits for it."""

    def __init__(self, tensor):
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            self._host, self._done = tensor.to("cpu", copy=True), None
            return
        # Queued on the stream that computed the tensor, so the copy reads it after it was written.
        stream = torch.cuda.current_stream(tensor.device)
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record(stream)

    def tolist(self):
        """The values as Python numbers; waits for this copy only, not for later GPU work."""
        if self._done is not None and not self._done.query():
            self._done.synchronize()
        return self._host.tolist()


class DeferredScalars:
    """Logs scalar tensors into FastReID's EventStorage without a host-device synchronisation.

    ``put({name: 0-dim tensor})``: CPU values are logged at once. CUDA values are stacked into one
    tensor, copied (``HostCopy``) and logged at the next ``put`` (or ``flush``), one training step
    later, under the iteration they were put at.
    """

    def __init__(self):
        self.pending = None  # (names, HostCopy of the last CUDA values, their iteration), not logged yet

    def put(self, values):
        names = list(values)
        stacked = torch.stack([values[name].detach().float() for name in names])
        storage = get_event_storage()
        if stacked.device.type != "cuda":
            for name, value in zip(names, stacked.tolist()):
                storage.put_scalar(name, value)
            return
        self.flush()
        self.pending = names, HostCopy(stacked), storage.iter

    def flush(self):
        """Log the pending values, if any."""
        if self.pending is not None:
            (names, copy, iteration), self.pending = self.pending, None
            with at_iteration(get_event_storage(), iteration) as storage:
                for name, value in zip(names, copy.tolist()):
                    storage.put_scalar(name, value)

    def __deepcopy__(self, memo):
        return DeferredScalars()  # a CUDA event cannot be copied; a copy starts empty


class DeferredLossLog:
    """One training step's loss dict, copied to the host and written into the log later.

    ``write(trainer, fastreid_write)`` calls FastReID's own ``SimpleTrainer._write_metrics`` on the
    host values, with the trainer's and the EventStorage's iteration set to this step's: the loss
    history, ``total_loss``, the gathering across processes and the NaN check (whose error names
    the iteration) are FastReID's, one step late.
    """

    def __init__(self, iteration, loss_dict, data_time):
        self.iteration = iteration
        self.names = list(loss_dict)
        self.copy = HostCopy(torch.stack([loss_dict[name].detach().float() for name in self.names]))
        self.data_time = data_time

    def write(self, trainer, fastreid_write):
        values = {name: torch.tensor(value) for name, value in zip(self.names, self.copy.tolist())}
        now = trainer.iter
        trainer.iter = self.iteration                   # named by FastReID's NaN error
        try:
            with at_iteration(get_event_storage(), self.iteration):
                fastreid_write(trainer, values, self.data_time)
        finally:
            trainer.iter = now


@contextlib.contextmanager
def at_iteration(storage, iteration):
    """``storage`` with its iteration set to ``iteration`` for the values put inside."""
    now, storage.iter = storage.iter, iteration
    try:
        yield storage
    finally:
        storage.iter = now
