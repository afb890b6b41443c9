"""The optimizer FastReID builds: over the real parameters, never over ContiguousParams' buffers."""
from .patch import _patch


# --------------------------------------------------------------------------------------------
# 4. SILENT: ContiguousParams + torch 2.x zero_grad(set_to_none=True) -> optimizer never steps
# --------------------------------------------------------------------------------------------
class PlainParams:
    """What ``fastreid.solver.build_optimizer`` gets in place of ``ContiguousParams``: the
    parameter groups as they are (``contiguous()`` returns them), so the optimizer holds the
    model's own parameters."""

    def __init__(self, params):
        self.params = params

    def contiguous(self):
        return self.params


@_patch
def _optimizer_not_contiguous():
    """``build_optimizer(cfg, model)`` (``contiguous=True``, as ``DefaultTrainer`` calls it) hands
    the optimizer ContiguousParams' flat buffers. torch 2.x's ``zero_grad()`` sets gradients to
    None, which detaches the parameters from the flat gradient buffer: the loss is computed and
    back-propagated but no weight ever changes, with no error. The name ``ContiguousParams`` in
    FastReID's solver module now means ``PlainParams``; ``build_optimizer`` itself is FastReID's."""
    import fastreid.solver.build as solver_build

    solver_build.ContiguousParams = PlainParams
