"""FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode`` (a
multiply-add counts as 2 FLOPs; matrix products, convolutions and attention only), with no
operator of that kind left uncounted."""
import re

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .speed import fresh


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


# PyTorch's CPU attention kernel, which FlopCounterMode (torch 2.x) has no formula for: counted
# with PyTorch's own formula for the GPU attention kernels (the same two matrix products).
EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
# ATen operator names of matrix products, convolutions and attention (``aten.<name>``).
MATRIX_OPS = re.compile(r"\w*mm|\w*mv|v?dot|matmul|linear|einsum|\w*conv\w*|\w*attention\w*")


class FlopCountError(RuntimeError):
    """The model runs an operator FlopCounterMode has no formula for: its count would be low."""


class _OpsSeen(TorchDispatchMode):
    """The ATen operators a forward pass runs."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def count_flops(model, inputs):
    """FLOPs of ``model(inputs)`` (a multiply-add = 2 FLOPs; FlopCounterMode's convention), once
    its caches are filled (PromptSG embeds the simplified prompt once, at its first call). The
    fused fast path of nn.MultiheadAttention, which FlopCounterMode does not see, is off while
    counting; an operator that looks like a matrix product but has no formula is an error."""
    with torch.no_grad():
        model(fresh(inputs))
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    seen = _OpsSeen()
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter, seen:
            model(fresh(inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    uncounted = sorted(str(op) for op in seen.ops
                       if MATRIX_OPS.fullmatch(str(op).split(".")[-1]) and op not in counter.flop_registry)
    if uncounted:
        raise FlopCountError(f"FlopCounterMode has no formula for {', '.join(uncounted)}: the FLOPs would be "
                             f"undercounted")
    return counter.get_total_flops()
