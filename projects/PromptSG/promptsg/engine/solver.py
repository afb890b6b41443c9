"""Fused optimizer kernels for FastReID's solver (SOLVER.FUSED).

FastReID builds ``torch.optim.<SOLVER.OPT>`` with PyTorch's default multi-tensor (foreach) update.
``fused=True`` computes the same update with one kernel per parameter group and dtype, which on
a GPU takes the optimizer step off the host's critical path (benchmarks/h100_profile).
"""
import logging

logger = logging.getLogger(__name__)


def with_fused_kernels(optimizer):
    """``optimizer`` rebuilt over the same parameter groups with ``fused=True``.

    Only a fresh optimizer (no state yet) is rebuilt. One whose class has no fused
    implementation, or whose parameters sit on a device without one, is returned unchanged.
    """
    if "fused" not in optimizer.defaults or optimizer.state or optimizer.defaults["fused"]:
        return optimizer
    groups = [{**group, "fused": True, "foreach": None} for group in optimizer.param_groups]
    try:
        return type(optimizer)(groups, **{**optimizer.defaults, "fused": True, "foreach": None})
    except (RuntimeError, TypeError, ValueError) as exc:  # no fused kernel for these parameters
        logger.info("SOLVER.FUSED: keeping the multi-tensor %s (%s)", type(optimizer).__name__, exc)
        return optimizer
