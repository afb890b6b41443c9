"""The optimizer FastReID builds: over the real parameters, in merged parameter groups."""
from .patch import _patch


# --------------------------------------------------------------------------------------------
# 4. SILENT: ContiguousParams + torch 2.x zero_grad(set_to_none=True) -> optimizer never steps
# --------------------------------------------------------------------------------------------
@_patch
def _optimizer_not_contiguous():
    """Build optimizers over the real parameters, never over ContiguousParams' flat buffers.

    torch 2.x's ``zero_grad()`` sets gradients to None, which detaches the parameters from the
    flat gradient buffer that ContiguousParams hands to the optimizer: the loss is computed and
    back-propagated but no weight ever changes, with no error.
    """
    import fastreid.engine.defaults as defaults
    import fastreid.solver as solver
    import fastreid.solver.build as solver_build

    original = solver_build.build_optimizer
    if getattr(original, "_promptsg_patched", False):
        return

    def build_optimizer(cfg, model, contiguous=False):
        optimizer, params = original(cfg, model, contiguous=False)
        if cfg.SOLVER.get("FUSED", False):  # not a fix: PromptSG's SOLVER.FUSED (promptsg/engine/solver.py)
            from ..solver import with_fused_kernels
            optimizer = with_fused_kernels(optimizer)
        return optimizer, params

    build_optimizer._promptsg_patched = True
    build_optimizer.__doc__ = original.__doc__
    for module in (solver_build, solver, defaults):
        module.build_optimizer = build_optimizer


@_patch
def _optimizer_merged_param_groups():
    """One optimizer parameter group per distinct set of hyper-parameters, not per parameter.

    FastReID gives every parameter its own group, so Adam's multi-tensor (foreach) kernels run
    once per parameter: on an H100 the optimizer step of ViT-B/16 took longer than its forward
    pass (benchmarks/h100_profile). Parameters with equal lr, weight decay and freeze status
    share a group; the update of every parameter, and the LR schedules (which scale each group
    from its own initial lr), are unchanged.
    """
    import fastreid.solver.build as solver_build

    original = solver_build.get_default_optimizer_params
    if getattr(original, "_promptsg_patched", False):
        return

    def get_default_optimizer_params(*args, **kwargs):
        merged = {}
        for group in original(*args, **kwargs):
            key = tuple(sorted((k, v) for k, v in group.items() if k != "params"))
            merged.setdefault(key, {**group, "params": []})["params"].extend(group["params"])
        return list(merged.values())

    get_default_optimizer_params._promptsg_patched = True
    solver_build.get_default_optimizer_params = get_default_optimizer_params
