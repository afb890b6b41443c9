"""FastReID's Checkpointer reads files with ``torch.load``, whose defaults torch 2.6 changed."""
from .patch import _patch


# --------------------------------------------------------------------------------------------
# 9. torch.load defaults to weights_only=True (torch >= 2.6)
# --------------------------------------------------------------------------------------------
@_patch
def _checkpoint_load():
    """Load FastReID checkpoints as data (``checkpoint.read_checkpoint``: ``weights_only=True``,
    NumPy arrays allowed, every member's CRC-32 checked). FastReID's ``torch.load`` without
    ``weights_only`` fails on torch >= 2.6 for NumPy arrays, and would run any code a crafted file
    pickles; an empty, truncated, altered or foreign file is one line naming it."""
    from fastreid.utils.checkpoint import Checkpointer

    from ..checkpoint import read_checkpoint

    if getattr(Checkpointer._load_file, "_promptsg_patched", False):
        return

    def _load_file(self, f):
        return read_checkpoint(f)

    _load_file._promptsg_patched = True
    Checkpointer._load_file = _load_file
