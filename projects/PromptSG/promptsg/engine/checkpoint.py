"""Trained checkpoints: loaded whole or refused, written only when every number in them is finite.

FastReID's ``Checkpointer`` loads what matches and logs the rest: a checkpoint of another model
(the CLIP baseline's into PromptSG, a tiny CLIP's into a small one) loads partially and evaluates
to a wrong mAP without an error, and a checkpoint holding NaN weights is written and evaluated.
``AtomicCheckpointer``, the project's subclass (the trainer's, ``engine.trainer.Trainer``, and
``load_for_inference``'s, which every tool and ``promptsg.load`` use), refuses both in one line,
writes each file atomically and keeps the random streams for ``--resume``.

The one part of a trained model that may be left out is the ID classifier (``CLASSIFIER_KEYS``):
its shape is the number of training identities. Evaluation and feature extraction never use it
(``--eval-only`` builds it with 0 rows), and fine-tuning on another dataset
(``MODEL.WEIGHTS_NEW_CLASSIFIER True``) trains a new one; both log that it was left out.
"""
import contextlib
import errno
import gc
import itertools
import logging
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch
from numpy._core import multiarray
from fastreid.engine.hooks import PeriodicCheckpointer
from fastreid.engine.train_loop import HookBase
from fastreid.utils import comm
from fastreid.utils.checkpoint import Checkpointer, _IncompatibleKeys, _strip_prefix_if_present

from ..modeling.interaction import FUSION_HISTORY, FUSIONS, MAP_FUSIONS, MAP_KEYS, MAP_PRIORS, REMOVED_FUSIONS
from .preflight import InputError, zip_directory_intact

logger = logging.getLogger(__name__)

# The tensors with one row per training identity: the ID classifier's weight (FastReID's
# EmbeddingHead, PromptSG's head, CLIP-ReID's two) and CLIP-ReID's identity prompts and their text
# features. None is used at test time.
CLASSIFIER_KEYS = ("heads.weight", "heads.classifier.weight", "heads.classifier_proj.weight", "prompts.context",
                   "identity_text")


class CheckpointError(InputError):
    """A checkpoint that is unreadable, of another model, or holds non-finite numbers."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or weight; the message names the term and iteration."""


class DiskFullError(OSError):
    """A file of the run could not be written for lack of space; the message names the folder,
    what is free and what was needed. What was written before is kept whole."""


def _first(keys, n=3):
    keys = list(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_compatible(path, model_state, checkpoint_state, skip_classifier):
    """Raise CheckpointError unless ``checkpoint_state`` holds exactly ``model_state``'s keys and
    shapes; with ``skip_classifier`` the ID classifier may be absent or of another shape.
    Returns the classifier keys that are to be left out (not loaded)."""
    missing = [k for k in model_state if k not in checkpoint_state]
    unexpected = [k for k in checkpoint_state if k not in model_state]
    reshaped = [k for k in model_state if k in checkpoint_state
                and tuple(model_state[k].shape) != tuple(checkpoint_state[k].shape)]
    skipped = []
    if skip_classifier:
        skipped = [k for k in missing + unexpected + reshaped if k in CLASSIFIER_KEYS]
        missing, unexpected, reshaped = ([k for k in keys if k not in CLASSIFIER_KEYS]
                                         for keys in (missing, unexpected, reshaped))
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's tensors missing ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model does not have ({_first(unexpected)})")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape ({k}: {tuple(checkpoint_state[k].shape)} in the "
                        f"checkpoint, {tuple(model_state[k].shape)} in the model)")
    if problems:
        hint = "" if skip_classifier or not any(k in CLASSIFIER_KEYS for k in reshaped + missing) else (
            "; to fine-tune on another dataset with a new ID classifier, set MODEL.WEIGHTS_NEW_CLASSIFIER True")
        raise CheckpointError(f"{path} is not a checkpoint of this model (config): {'; '.join(problems)}{hint}")
    return skipped


FUSION_KEY = "heads.mim.fusion_index"
PRIOR_KEY = "heads.mim.map_prior_index"
KEYS_KEY = "heads.mim.map_keys_index"
SCALES_KEY = "heads.mim.map_scales"
# MIM.MAP_CONTRAST and MIM.MAP_PRIOR_POWER, in the order of ``map_scales``, and the values of a
# checkpoint older than the key (the defaults then).
SCALES = (("MAP_CONTRAST", 2.0), ("MAP_PRIOR_POWER", 1.0))


def check_mim_fusion(path, model_state, checkpoint_state):
    """Refuse a checkpoint whose MIM was trained with another MODEL.PROMPTSG.MIM.FUSION, MAP_PRIOR,
    MAP_KEYS, MAP_CONTRAST or MAP_PRIOR_POWER than the model's, or with a wiring since removed: fusions
    can share parameter names, so it would load and silently compute another feature. ``fusion_index``
    indexes FUSION_HISTORY. A checkpoint with a MIM but no ``fusion_index`` predates the key; its MIM
    added the query back ("query_residual")."""
    if FUSION_KEY not in model_state:
        return
    if FUSION_KEY not in checkpoint_state:
        if not any(k.startswith("heads.mim.") for k in checkpoint_state):
            return                                   # no MIM at all: check_compatible says so
        checkpoint_state[FUSION_KEY] = torch.tensor(FUSION_HISTORY.index("query_residual"))
    index, fusion = int(checkpoint_state[FUSION_KEY]), FUSION_HISTORY[int(model_state[FUSION_KEY])]
    trained = FUSION_HISTORY[index] if 0 <= index < len(FUSION_HISTORY) else f"unknown ({index})"
    if trained in REMOVED_FUSIONS:
        raise CheckpointError(f"{path} was trained with MODEL.PROMPTSG.MIM.FUSION {trained}, a wiring since removed "
                              f"(docs/EXPERIMENTS.md, \"Language guidance at test\"): evaluate it with the release "
                              f"that trained it, or train again with one of {list(FUSIONS)}")
    if trained != fusion:
        raise CheckpointError(f"{path} was trained with MODEL.PROMPTSG.MIM.FUSION {trained}, the config has "
                              f"{fusion}: set MODEL.PROMPTSG.MIM.FUSION {trained} to evaluate or fine-tune it")
    # The map's prior (MIM.MAP_PRIOR) and keys (MIM.MAP_KEYS) likewise; a checkpoint older than a
    # key had none / the patch tokens.
    for key, option, values in ((PRIOR_KEY, "MAP_PRIOR", MAP_PRIORS), (KEYS_KEY, "MAP_KEYS", MAP_KEYS)):
        index = int(checkpoint_state.setdefault(key, torch.tensor(0)))
        trained = values[index] if 0 <= index < len(values) else f"unknown ({index})"
        configured = values[int(model_state[key])]
        if trained != configured:
            raise CheckpointError(f"{path} was trained with MODEL.PROMPTSG.MIM.{option} {trained!r}, the config has "
                                  f"{configured!r}: set MODEL.PROMPTSG.MIM.{option} {trained!r} to evaluate or "
                                  f"fine-tune it")
    # The map's contrast and the prior's power (map fusions only: "attention" has no map to scale).
    trained_scales = checkpoint_state.setdefault(SCALES_KEY, torch.tensor([value for _, value in SCALES]))
    if fusion in MAP_FUSIONS:
        for (option, _), trained, configured in zip(SCALES, trained_scales.tolist(), model_state[SCALES_KEY].tolist()):
            if trained != configured:
                raise CheckpointError(f"{path} was trained with MODEL.PROMPTSG.MIM.{option} {trained:g}, the config "
                                      f"has {configured:g}: set MODEL.PROMPTSG.MIM.{option} {trained:g} to evaluate or "
                                      f"fine-tune it")


def first_non_finite(named_tensors):
    """The name of the first floating-point tensor holding NaN or infinity, else None. One host
    read for all of them (a checkpoint-time check, not a per-step one)."""
    named = [(name, t) for name, t in named_tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all().to("cpu", non_blocking=False) for _, t in named]).tolist()
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def state_tensors(data, prefix=""):
    """(name, tensor) for every tensor in a nested checkpoint dict (model, optimizer state, ...)."""
    if torch.is_tensor(data):
        yield prefix, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from state_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from state_tensors(value, f"{prefix}.{i}")


def check_finite_checkpoint(path, data):
    """Refuse to write (or load) a checkpoint whose weights or optimizer state are not finite."""
    name = first_non_finite(state_tensors(data))
    if name is not None:
        raise NonFiniteError(f"{path}: {name} holds NaN or infinity; the checkpoint is not written "
                             f"(the last one written is kept)")


# ---- a full disk: one line, nothing half-written left behind ----
MB = 1024 * 1024


def checkpoint_bytes(data):
    """About how many bytes ``torch.save(data)`` writes: its tensors' bytes (the pickle is small)."""
    return sum(t.numel() * t.element_size() for _, t in state_tensors(data))


def free_bytes(folder):
    return shutil.disk_usage(folder).free


def out_of_space(exc, folder, need):
    """Whether ``exc``, raised while writing ``need`` bytes into ``folder``, is a full disk: ENOSPC or
    EDQUOT, or torch's zip writer failing (``unexpected pos``, ``file write failed``: it does not
    pass the errno on) with less than ``need`` bytes free."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, (OSError, RuntimeError)) and free_bytes(folder) < need


def disk_full(path, need, what="the checkpoint"):
    """The DiskFullError for ``path`` (``need`` bytes), naming its folder and the space there."""
    folder = os.path.dirname(os.path.abspath(path))
    return DiskFullError(errno.ENOSPC, f"no space left in {folder} to write {os.path.basename(path)}: "
                                       f"{free_bytes(folder) / MB:.1f} MB free, {what} needs about "
                                       f"{need / MB:.1f} MB; free space (earlier files are whole)")


def save_atomically(path, write, need, what="the checkpoint"):
    """``write(tmp)`` to a temporary file beside ``path``, then renamed over it. A full disk raises
    DiskFullError (one line; ``what`` needs ``need`` bytes) and removes the temporary file; a file
    already at ``path`` stays."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
        return
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not out_of_space(exc, os.path.dirname(os.path.abspath(path)), need):
            raise
    # torch's zip writer, left open by the failed write, keeps the removed file's blocks until the
    # failed call's frames are collected: collect them before saying how much space is free
    gc.collect()
    raise disk_full(path, need, what)


def check_space_to_resume(save_dir):
    """``--resume`` needs room for one more checkpoint like its newest (written beside it, then
    renamed): refuse at start-up in one line rather than after an epoch of training."""
    newest = newest_checkpoint(save_dir)
    if newest:
        need = os.path.getsize(newest)
        if free_bytes(save_dir) < need:
            raise disk_full(os.path.join(save_dir, "model_NNNN.pth"), need,
                            f"a checkpoint like {os.path.basename(newest)}")


def check_finite_features(features, what="features"):
    """Evaluation and the tools refuse non-finite features in one line (a NaN model's ranking is noise)."""
    bad = ~torch.isfinite(torch.as_tensor(features)).reshape(len(features), -1).all(dim=1)
    count = int(bad.sum())
    if count:
        raise NonFiniteError(f"{count} of {len(features)} {what} hold NaN or infinity (first: row "
                             f"{int(bad.nonzero()[0])}); the model's weights are not finite, no metric is computed")


def check_finite_losses(iteration, losses):
    """Stop training at the first iteration whose logged loss terms are not all finite, naming
    them. All terms at once means the weights went non-finite in the previous update."""
    bad = [name for name, value in losses.items() if not torch.isfinite(torch.as_tensor(value)).all()]
    if not bad:
        return
    if len(bad) == len(losses) and len(losses) > 1:
        cause = ("every term at once: the weights became non-finite in the update of iteration "
                 f"{iteration - 1} (learning rate too high?)")
    else:
        cause = "the other terms are finite"
    raise NonFiniteError(f"iteration {iteration}: {', '.join(bad)} not finite ({cause}); training stopped, "
                         f"the last checkpoint written is kept")


# ---- reading a checkpoint: data, not code; its bytes as written ----
def _numpy_globals():
    """The non-torch types a FastReID checkpoint may hold: NumPy arrays (FastReID converts them to
    tensors on load, ``Checkpointer._convert_ndarray_to_tensor``) and NumPy scalars."""
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
            *{type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                          "uint8", "bool")}]


def verify_archive(path):
    """Raise CheckpointError unless every member of the ``torch.save`` zip at ``path`` matches the
    CRC-32 written with it: torch's reader never checks them, so bytes altered inside a tensor
    (the zip directory intact) would load as weights and evaluate to a wrong mAP."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: its member {bad} fails its CRC-32 check: the file was altered or damaged "
                              f"after it was written; use another copy or checkpoint")


def read_checkpoint(path):
    """A FastReID checkpoint file as its dict, read as data: ``torch.load(weights_only=True)``,
    with only NumPy's array and scalar types allowed beyond torch's own (unpickling anything else
    could run code, so it is refused, naming the type), after ``verify_archive``. Every failure
    is one CheckpointError naming the file."""
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped:
        verify_archive(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(f"{path}: not loaded: it holds an object of type {found.group(1)}, which a "
                                  f"FastReID checkpoint never holds (unpickling it could run code)") from None
        raise CheckpointError(f"{path}: not a torch checkpoint (its contents are not torch.save data)") from None
    except Exception as exc:  # not a torch file at all
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: not a FastReID checkpoint (no 'model' state dict; a CLIP file "
                              f"belongs in MODEL.CLIP.PRETRAINED)")
    return data


class AtomicCheckpointer(Checkpointer):
    """FastReID's ``Checkpointer`` that loads whole or refuses, and writes atomically.

    * ``load`` (``MODEL.WEIGHTS``, ``--resume``, ``--eval-only``, every tool): the weights must be
      finite, of this model's wiring (``check_mim_fusion``) and match its tensors one for one
      (``check_compatible``); FastReID's loads what matches and logs the rest. With
      ``skip_classifier`` the ID classifier alone is left out, logged (evaluation, the tools,
      fine-tuning with ``MODEL.WEIGHTS_NEW_CLASSIFIER``).
    * ``save``: to a temporary file renamed over the target (``save_atomically``: an interrupted
      save never destroys the checkpoint on disk; a full disk is one line, ``DiskFullError``);
      weights or optimizer state holding NaN or infinity are refused, so the last checkpoint is the
      last good one; a trainer's checkpoint also holds the RNG states (``rng_state``).
    * ``last_checkpoint`` is written atomically too, and ``--resume`` takes the newest complete
      checkpoint even without it (``newest_checkpoint``).
    """

    skip_classifier = False

    def load(self, path, checkpointables=None):
        self._loading = path
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading = None

    def _load_model(self, checkpoint):
        path = getattr(self, "_loading", None) or "checkpoint"
        state = checkpoint.pop("model")
        self._convert_ndarray_to_tensor(state)
        _strip_prefix_if_present(state, "module.")
        bad = first_non_finite(state.items())
        if bad is not None:
            raise CheckpointError(f"{path}: {bad} holds NaN or infinity; a model with non-finite weights "
                                  f"gives no meaningful result")
        own = self.model.state_dict()
        check_mim_fusion(path, own, state)
        skipped = check_compatible(path, own, state, self.skip_classifier)
        for key in skipped:
            state.pop(key, None)
        if skipped:
            self.logger.info("%s: the ID classifier (%s) is left out: it is not used at test time, and "
                             "fine-tuning trains a new one", path, ", ".join(skipped))
        self.model.load_state_dict(state, strict=not skipped)
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.checkpointables:           # a trainer's checkpoint: --resume continues its random streams
            data["rng"] = rng_state()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        check_finite_checkpoint(save_file, data)
        save_atomically(save_file, lambda tmp: torch.save(data, tmp), checkpoint_bytes(data))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(last_filename_basename)

        save_atomically(os.path.join(self.save_dir, "last_checkpoint"), write, len(last_filename_basename))

    def get_checkpoint_file(self):
        return newest_checkpoint(self.save_dir)

    def has_checkpoint(self):
        return bool(self.save_dir) and bool(newest_checkpoint(self.save_dir))

    @classmethod
    def replacing(cls, checkpointer):
        """An ``AtomicCheckpointer`` over what FastReID's ``checkpointer`` holds (the trainer's)."""
        return cls(checkpointer.model, checkpointer.save_dir, save_to_disk=checkpointer.save_to_disk,
                   **checkpointer.checkpointables)


def load_for_inference(model, path):
    """Load a trained checkpoint for evaluation or feature extraction: whole, finite, its ID
    classifier (unused at test time) left out. Returns the checkpoint's extra data."""
    checkpointer = AtomicCheckpointer(model)
    checkpointer.skip_classifier = True
    return checkpointer.load(path, checkpointables=[])


class SaveFinalBeforeEvaluation(HookBase):
    """A trainer hook, placed before FastReID's EvalHook: at the end of the last epoch it writes
    ``model_final`` before the final evaluation runs, so an error found by the evaluation (a
    corrupt query image, a bad TEST key) does not lose the trained model. If the disk is full,
    the evaluation still runs and its results are written: the error is kept in
    ``trainer.write_failures`` and raised once they are (``tools/train_net.py``)."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def after_epoch(self):
        if self.trainer.epoch + 1 >= self.trainer.max_epoch:
            try:
                self.checkpointer.save("model_final", epoch=self.trainer.epoch)
            except DiskFullError as exc:
                keep_write_failure(self.trainer, exc)


def keep_write_failure(trainer, exc):
    """Log a final checkpoint the disk could not hold and keep it in ``trainer.write_failures``,
    raised once the results are written."""
    logger.error("%s", exc)
    trainer.write_failures = [*getattr(trainer, "write_failures", []), exc]


class PeriodicCheckpointerFinalOnce(PeriodicCheckpointer):
    """FastReID's PeriodicCheckpointer, except at the last epoch: ``model_final`` is written once,
    before the evaluation (``SaveFinalBeforeEvaluation``), not again after it (FastReID rewrites
    it with the metric: twice a checkpoint's space at the run's end). ``model_best`` is written as
    FastReID writes it; on a full disk its failure is kept like the final one's."""

    def step(self, epoch, **kwargs):
        if int(epoch) < self.max_epoch - 1:
            return super().step(epoch, **kwargs)
        if kwargs.get("metric", -1) > self.best_metric:
            try:
                self.checkpointer.save("model_best", epoch=int(epoch), **kwargs)
            except DiskFullError as exc:
                keep_write_failure(self.trainer, exc)


def is_complete(path):
    """A ``torch.save`` file with its zip directory in place (a kill mid-write leaves none)."""
    return zip_directory_intact(path)


def newest_checkpoint(save_dir):
    """The checkpoint to resume from: the one ``last_checkpoint`` names when it is complete, else
    the newest complete ``model_final.pth`` or ``model_NNNN.pth`` (by epoch); "" if none."""
    if not save_dir or not os.path.isdir(save_dir):
        return ""
    try:
        with open(os.path.join(save_dir, "last_checkpoint")) as f:
            tagged = os.path.join(save_dir, f.read().strip())
        if os.path.basename(tagged) and is_complete(tagged):
            return tagged
    except OSError:
        pass
    ranked = []
    for name in os.listdir(save_dir):
        match = re.fullmatch(r"model_(\d+|final)\.pth", name)
        if match:
            ranked.append((float("inf") if match.group(1) == "final" else int(match.group(1)), name))
    for _, name in sorted(ranked, reverse=True):
        path = os.path.join(save_dir, name)
        if is_complete(path):
            logger.warning("%s: no usable last_checkpoint; resuming from the newest complete checkpoint, %s",
                           save_dir, name)
            return path
    return ""


# ---- resuming where the run stopped ----

def rng_state():
    """The process's torch, NumPy and Python RNG states, as tensors and numbers (so the
    checkpoint still loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype("int64")),
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
            "python_version": int(version), "python_state": torch.tensor(internal, dtype=torch.int64),
            "python_gauss": gauss_next}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))


class SkippedIndices:
    """A training sampler's index stream less its first ``skip`` indices (drawn, not loaded)."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler)


def resume_training_position(trainer, checkpoint):
    """After ``--resume`` loaded the weights, optimizer and scheduler: continue the run where it
    stopped. FastReID's training samplers are infinite streams that restart from their seed when
    the loader is iterated anew, so a resumed run would see the first epochs' batches again: the
    sampler is wrapped to skip the indices the finished epochs used (``SkippedIndices``; drawn
    again, without loading an image, so its NumPy stream is where it was), and the RNG states saved
    with the checkpoint are restored. On a CPU with ``DATALOADER.NUM_WORKERS 0`` a resumed seeded
    run ends exactly as the uninterrupted one. With several processes each one's RNG state is its
    own and only the sampler position is restored; data-loader workers reseed themselves per epoch."""
    loader = trainer._trainer.data_loader
    batches = getattr(loader, "batch_sampler", None)
    sampler = getattr(batches, "sampler", None)
    iterations = trainer.start_epoch * trainer.iters_per_epoch
    if sampler is None or not hasattr(sampler, "_infinite_indices"):
        logger.warning("resume: the training sampler %s cannot skip its used indices; the data order restarts",
                       type(sampler).__name__)
    else:
        batches.sampler = SkippedIndices(sampler, iterations * batches.batch_size)
        if hasattr(loader, "_shutdown_background_thread") and hasattr(loader, "iter"):
            loader._shutdown_background_thread()
        trainer._trainer._data_loader_iter = iter(loader)
    if "rng" in checkpoint and comm.get_world_size() == 1:
        set_rng_state(checkpoint["rng"])
    logger.info("resume: epoch %d, iteration %d; sampler position and RNG states restored", trainer.start_epoch,
                iterations)
