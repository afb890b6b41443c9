"""Several training processes train the model one process trains on the same global batch.

DistributedDataParallel averages the processes' gradients, which equals one process's gradient
only for per-sample terms such as the ID loss. PromptSG's other terms are functions of the whole
batch: the triplet loss mines its hardest positive and negative, L_SupCon's softmax runs over
every prompt and image, and BatchNorm (the BNNeck and f_theta's last layer) normalises by batch
statistics. Computed on each process's share alone, they would see fewer identities and other
statistics with every added process. Here:

  * ``gather_batch`` concatenates a batch tensor over the processes, in rank order, with the
    gradient flowing back to each process's share: the sum of the gradients of every process's
    copy of the loss, which DDP's average over processes turns into the gradient of the
    global-batch loss;
  * ``GlobalBatchNorm1d`` normalises by the global batch's mean and variance (two all-reduces of
    about D numbers each, with autograd), works on gloo (CPU) and NCCL alike (``nn.SyncBatchNorm``
    refuses CPU tensors), and keeps BatchNorm1d's parameters, buffers and checkpoint keys.

With FastReID's identity sampler patched to draw each global batch whatever the number of
processes (``compat._global_batches``), N processes then follow one process's run step for step
(``tests/test_distributed.py``). One process: both are the identity / plain BatchNorm1d.
"""
import torch
import torch.distributed as dist
from torch import nn


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(tensor):
    """(b, ...) on each process -> (W * b, ...), the processes' shares in rank order; every
    process's share is b rows (FastReID's training loader gives each the same)."""
    return tensor if world_size() == 1 else _GatherBatch.apply(tensor)


def all_reduce_sum(tensor):
    """Sum over the processes; its gradient is likewise summed over the processes."""
    return tensor if world_size() == 1 else _SumOverProcesses.apply(tensor)


class _GatherBatch(torch.autograd.Function):
    """all_gather forward; backward: the gradient of every process's copy of the loss, summed,
    then this process's rows (a sum over processes, as DDP's average expects of a loss that each
    process computes whole)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = slice(dist.get_rank() * len(tensor), (dist.get_rank() + 1) * len(tensor))
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


class _SumOverProcesses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (all processes).

    Single process, evaluation, or a module without batch statistics: exactly BatchNorm1d.
    """

    def forward(self, x):
        if not (self.training and self.track_running_stats) or world_size() == 1:
            return super().forward(x)
        xf = x.float()
        sums = all_reduce_sum(torch.cat([xf.sum(0), xf.new_tensor([float(x.shape[0])])]))
        mean, count = sums[:-1] / sums[-1], sums[-1]
        # Two passes, as the single-process kernel: sum of squared deviations from the global mean.
        var = all_reduce_sum(((xf - mean) ** 2).sum(0)) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            # momentum None: BatchNorm1d's cumulative average
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = var * count / (count - 1).clamp(min=1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


__all__ = ["GlobalBatchNorm1d", "gather_batch", "world_size"]
