"""FastReID's Checkpointer: loads whole or refuses, saves atomically, and never writes NaN."""
import os

import torch

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


# --------------------------------------------------------------------------------------------
# Checkpoints of another model load partially, and NaN weights load, without an error
# --------------------------------------------------------------------------------------------
@_patch
def _checkpoint_load_whole():
    """``Checkpointer.load`` loads a checkpoint whole or refuses it (``checkpoint.check_compatible``):
    FastReID's loads the matching tensors, logs the rest and evaluates a half-loaded model. A
    ``Checkpointer`` whose ``skip_classifier`` is True (evaluation, the tools, fine-tuning with
    ``MODEL.WEIGHTS_NEW_CLASSIFIER``) leaves out the ID classifier alone, logged. Loaded weights
    must be finite."""
    from fastreid.utils.checkpoint import Checkpointer, _IncompatibleKeys, _strip_prefix_if_present

    from ..checkpoint import CheckpointError, check_compatible, check_mim_fusion, first_non_finite

    if getattr(Checkpointer._load_model, "_promptsg_patched", False):
        return
    fastreid_load = Checkpointer.load
    Checkpointer.skip_classifier = False

    def load(self, path, checkpointables=None):
        self._promptsg_loading = path
        try:
            return fastreid_load(self, path, checkpointables)
        finally:
            self._promptsg_loading = None

    def _load_model(self, checkpoint):
        path = getattr(self, "_promptsg_loading", None) or "checkpoint"
        state = checkpoint.pop("model")
        self._convert_ndarray_to_tensor(state)
        _strip_prefix_if_present(state, "module.")
        bad = first_non_finite(state.items())
        if bad is not None:
            raise CheckpointError(f"{path}: {bad} holds NaN or infinity; a model with non-finite weights "
                                  f"gives no meaningful result")
        check_mim_fusion(path, self.model.state_dict(), state)
        skipped = check_compatible(path, self.model.state_dict(), state, self.skip_classifier)
        for key in skipped:
            state.pop(key, None)
        if skipped:
            self.logger.info("%s: the ID classifier (%s) is left out: it is not used at test time, and "
                             "fine-tuning trains a new one", path, ", ".join(skipped))
        self.model.load_state_dict(state, strict=not skipped)
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])

    load._promptsg_patched = _load_model._promptsg_patched = True
    Checkpointer.load = load
    Checkpointer._load_model = _load_model


# --------------------------------------------------------------------------------------------
# Checkpoints are written in place: a crash while saving model_best.pth loses the previous one
# --------------------------------------------------------------------------------------------
@_patch
def _checkpoint_atomic_save():
    """``Checkpointer.save`` writes to a temporary file and renames it over the target, so an
    interrupted save never destroys a checkpoint already on disk (a full disk is one line,
    ``checkpoint.DiskFullError``, and leaves no temporary file); and it refuses weights or
    optimizer state holding NaN or infinity (``checkpoint.check_finite_checkpoint``), so the last
    checkpoint written is the last good one. ``last_checkpoint`` is written atomically too, and
    ``--resume`` finds the newest complete checkpoint even without it."""
    from fastreid.utils.checkpoint import Checkpointer

    from ..checkpoint import check_finite_checkpoint, checkpoint_bytes, newest_checkpoint, rng_state, save_atomically

    if getattr(Checkpointer.save, "_promptsg_patched", False):
        return

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.checkpointables:           # a trainer's checkpoint: --resume continues its random streams
            data["rng"] = rng_state()
        data.update(kwargs)
        basename = "{}.pth".format(name)
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        check_finite_checkpoint(save_file, data)
        save_atomically(save_file, lambda tmp: torch.save(data, tmp), checkpoint_bytes(data))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        """``last_checkpoint`` written to a temporary file and renamed: a kill mid-write never
        leaves it empty (FastReID writes it in place)."""
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(last_filename_basename)

        save_atomically(os.path.join(self.save_dir, "last_checkpoint"), write, len(last_filename_basename))

    def get_checkpoint_file(self):
        """The checkpoint ``last_checkpoint`` names if it is complete, else the newest complete
        ``model_NNNN.pth`` / ``model_final.pth`` in the folder (``checkpoint.newest_checkpoint``):
        a kill between a checkpoint's rename and the tag's write no longer restarts from scratch."""
        return newest_checkpoint(self.save_dir)

    def has_checkpoint(self):
        return bool(self.save_dir) and bool(newest_checkpoint(self.save_dir))

    save._promptsg_patched = True
    Checkpointer.save = save
    Checkpointer.tag_last_checkpoint = tag_last_checkpoint
    Checkpointer.get_checkpoint_file = get_checkpoint_file
    Checkpointer.has_checkpoint = has_checkpoint
