"""The optimizer the project's trainer builds from FastReID's (``trainer.Trainer.build_optimizer``):
merged parameter groups, and fused kernels with SOLVER.FUSED.

FastReID gives every parameter its own group, so Adam's multi-tensor (foreach) kernels run once per
parameter: on an H100 the optimizer step of ViT-B/16 took longer than its forward pass
(benchmarks/h100_profile). ``with_merged_groups`` puts parameters with equal hyper-parameters in
one group; every parameter's update, and the LR schedules (which scale each group from its own
initial lr), are unchanged.

FastReID builds ``torch.optim.<SOLVER.OPT>`` with PyTorch's default multi-tensor (foreach) update.
``fused=True`` computes the same update with one kernel per parameter group and dtype, which on
a GPU takes the optimizer step off the host's critical path (benchmarks/h100_profile).
"""
import logging

logger = logging.getLogger(__name__)


def with_merged_groups(optimizer):
    """``optimizer`` rebuilt with one parameter group per distinct set of hyper-parameters (lr,
    weight decay, freeze status, ...), in the order the groups first appear. Only a fresh optimizer
    (no state yet) is rebuilt."""
    if optimizer.state:
        return optimizer
    merged = {}
    for group in optimizer.param_groups:
        key = tuple(sorted((k, repr(v)) for k, v in group.items() if k != "params"))
        merged.setdefault(key, {**group, "params": []})["params"].extend(group["params"])
    if len(merged) == len(optimizer.param_groups):
        return optimizer
    return type(optimizer)(list(merged.values()), **optimizer.defaults)


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
