"""Compatibility patches for the PyPI ``fastreid==1.4.0`` wheel on Python 3.11, torch 2.x, NumPy 2.

The wheel targets Python <= 3.9 and torch 1.13. This module applies one small, named patch per
known breakage of the wheel that affects this project (docs/FASTREID_COMPAT.md lists them), two
GPU stream races found here (sections 12-13), the patches that turn FastReID's silent wrong
results into errors (partial checkpoint loads, NaN checkpoints, image modes read as grey), those
that let several processes train what one process trains, and nothing else.
``import promptsg`` applies them before any FastReID module is imported; every patch is idempotent
and has a regression test that fails without it (``tests/test_compat.py``, ``tests/test_faults.py``,
``tests/test_distributed.py``).

Breakages that need no patch on our stack:
  * ``np.bool`` (evaluation/rank.py): NumPy >= 2.0 defines ``np.bool`` again; requirements pin NumPy 2.
  * upstream ``tools/`` and ``demo/`` scripts: not in the wheel; this project ships its own tools.
"""
import collections
import collections.abc
import logging
import os
import subprocess
import sys
import time
import types
import warnings

import torch

logger = logging.getLogger(__name__)

APPLIED = []  # names of the patches applied in this process, in order
_PATCHES = []  # the patch functions, in the order they are applied


def _patch(fn):
    """Register ``fn`` as a patch; ``apply_all`` runs each one once."""
    fn.patch_name = fn.__name__.lstrip("_")
    _PATCHES.append(fn)
    return fn



# --------------------------------------------------------------------------------------------
# 1-2. Import failures: ``from collections import Mapping`` and ``from torch._six import string_classes``
# --------------------------------------------------------------------------------------------
@_patch
def _import_aliases():
    """Restore the two names FastReID imports that no longer exist (Python 3.10+, torch 2.x)."""
    if not hasattr(collections, "Mapping"):
        collections.Mapping = collections.abc.Mapping
    if "torch._six" not in sys.modules:
        six = types.ModuleType("torch._six")
        six.string_classes = (str, bytes)
        sys.modules["torch._six"] = six


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
            from .solver import with_fused_kernels
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


# --------------------------------------------------------------------------------------------
# 5. T.RandomAffine(resample=..., fillcolor=...) raises TypeError on torchvision >= 0.13
# --------------------------------------------------------------------------------------------
class _RandomAffine(__import__("torchvision").transforms.RandomAffine):
    """torchvision's RandomAffine accepting FastReID's removed keywords (resample, fillcolor)."""

    def __init__(self, *args, resample=None, fillcolor=None, **kwargs):
        if fillcolor is not None:
            kwargs.setdefault("fill", fillcolor)
        # resample=False meant nearest-neighbour, torchvision's default interpolation.
        super().__init__(*args, **kwargs)


@_patch
def _random_affine_keywords():
    import torchvision.transforms as T
    import fastreid.data.transforms.build as transforms_build

    if isinstance(transforms_build.T, types.ModuleType):
        namespace = types.SimpleNamespace(**{k: getattr(T, k) for k in dir(T) if not k.startswith("__")})
        namespace.RandomAffine = _RandomAffine
        transforms_build.T = namespace


# --------------------------------------------------------------------------------------------
# SILENT: read_image keeps an image's own mode: palette PNGs become grey index images
# --------------------------------------------------------------------------------------------
def image_to_rgb(image):
    """Any PIL image as 8-bit RGB: palette (P, PA) through its palette, alpha dropped (RGBA, LA),
    CMYK and YCbCr converted, 16- and 32-bit grey scaled from its full range to 0-255 (a plain
    ``convert`` clips 16-bit values at 255), float grey clipped to 0-255."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image)
        if image.mode == "F":
            array = np.clip(array, 0, 255)
        elif array.dtype == np.uint16 or image.mode.startswith("I;16") or int(array.max(initial=0)) > 255:
            array = np.clip(array.astype(np.float64) / 257.0, 0, 255)    # 0..65535 -> 0..255
        return Image.fromarray(np.rint(array).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")                                   # palette colours, not indices
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


@_patch
def _read_image_rgb():
    """FastReID's ``read_image`` (``format=None``, as its datasets call it) returns the file's own
    mode: a palette PNG's pixel indices are then read as grey levels (a (153,51,51) pixel as
    (55,55,55)), RGBA and CMYK images have 4 channels and crash the batch collation, and 16-bit grey
    crashes without naming the file. Every image is read as RGB (``image_to_rgb``), and an
    unreadable one raises an error that names it."""
    from fastreid.data import common, data_utils
    from PIL import Image, ImageOps

    if getattr(data_utils.read_image, "_promptsg_patched", False):
        return
    fastreid_read_image = data_utils.read_image

    def read_image(file_name, format=None):
        if format not in (None, "RGB"):
            return fastreid_read_image(file_name, format)
        try:
            with Image.open(file_name) as image:
                image.load()
                try:
                    image = ImageOps.exif_transpose(image)
                except Exception:  # malformed EXIF (Pillow issue 3973), as FastReID's
                    pass
                return image_to_rgb(image)
        except OSError as exc:
            raise OSError(f"cannot read image {file_name}: {exc}") from None

    read_image._promptsg_patched = True
    read_image.fastreid_read_image = fastreid_read_image
    data_utils.read_image = read_image
    common.read_image = read_image


# --------------------------------------------------------------------------------------------
# 8a. DataLoaderX creates a CUDA stream and moves batches with CUDA calls: fails on CPU
# --------------------------------------------------------------------------------------------
@_patch
def _cpu_data_loader():
    """Without CUDA, FastReID's loaders become plain ``torch.utils.data.DataLoader``s.

    With CUDA, DataLoaderX (background prefetch thread + copy stream) is kept, with the stream
    fix of section 13.
    """
    import fastreid.data.build as data_build
    from fastreid.data import data_utils

    if getattr(data_build.DataLoaderX, "_promptsg_patched", False):
        return
    original = data_utils.DataLoaderX

    class DataLoaderX(original):
        _promptsg_patched = True

        def __init__(self, local_rank, **kwargs):
            self._cuda = torch.cuda.is_available()
            if kwargs.get("num_workers", 0) > 0:
                kwargs.setdefault("multiprocessing_context", worker_start_method())
            if self._cuda:
                super().__init__(local_rank, **kwargs)
                return
            kwargs["pin_memory"] = False
            if kwargs.get("num_workers", 0) > 0:
                kwargs.setdefault("persistent_workers", True)
            torch.utils.data.DataLoader.__init__(self, **kwargs)
            self.local_rank = local_rank

        def __iter__(self):
            if self._cuda:
                return super().__iter__()
            return torch.utils.data.DataLoader.__iter__(self)

        def _shutdown_background_thread(self):
            if self._cuda and hasattr(self, "iter"):
                super()._shutdown_background_thread()

    data_build.DataLoaderX = DataLoaderX


def worker_start_method():
    """How loader workers start: "fork" where the platform has it, as in a single process.

    launch() starts each training process with "spawn", and a spawned process makes "spawn" its
    own default, so every loader worker of a multi-process run re-imported torch, FastReID,
    scikit-learn and sympy before its first batch: measured on this project's 2-core machine,
    the first test batch of a 2-process run took about 26 s (0.1 s in one process). Forked
    workers start at once; they only read images and never touch CUDA or the process group.
    """
    import multiprocessing

    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


# --------------------------------------------------------------------------------------------
# The test loader starts 4 workers whatever DATALOADER.NUM_WORKERS says (a multi-process stall)
# --------------------------------------------------------------------------------------------
@_patch
def _test_loader_workers():
    """``build_reid_test_loader(cfg, ...)`` takes ``num_workers`` from DATALOADER.NUM_WORKERS, as
    the training loader does (FastReID's from_config leaves it out: always 4, the function's
    default). An explicit ``num_workers=`` still wins."""
    import fastreid.data as data
    import fastreid.data.build as data_build
    import fastreid.engine.defaults as defaults
    from fastreid.config import configurable

    if getattr(data_build.build_reid_test_loader, "_promptsg_patched", False):
        return
    fastreid_function = data_build.build_reid_test_loader.__wrapped__

    def from_config(cfg, *, num_workers=None, **kwargs):
        args = data_build._test_loader_from_config(cfg, **kwargs)
        args["num_workers"] = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
        return args

    patched = configurable(from_config=from_config)(fastreid_function)
    patched._promptsg_patched = True
    for module in (data_build, data, defaults):
        module.build_reid_test_loader = patched


# --------------------------------------------------------------------------------------------
# Multi-process runs: the identity sampler's batches depend on the number of processes
# --------------------------------------------------------------------------------------------
@_patch
def _global_batches():
    """FastReID's NaiveIdentitySampler builds each global batch (IMS_PER_BATCH images) from W draws
    of IMS_PER_BATCH / (W x NUM_INSTANCE) identities, W the number of processes, so 2 processes
    trained on other batches than 1 process with the same seed and global batch. One draw of
    IMS_PER_BATCH / NUM_INSTANCE identities gives every W the batches of one process; FastReID's
    ``reorder_index`` then hands process r the r-th contiguous share (whole identities). With one
    process nothing changes. (promptsg.utils.distributed makes the losses and BatchNorm see the global
    batch; tests/test_distributed.py shows 2 processes training the weights of 1.)"""
    from fastreid.data import samplers

    cls = samplers.NaiveIdentitySampler
    if getattr(cls.__init__, "_promptsg_patched", False):
        return
    fastreid_init = cls.__init__

    def __init__(self, *args, **kwargs):
        fastreid_init(self, *args, **kwargs)
        self.num_pids_per_batch = self.batch_size // self.num_instances   # global, not per process

    __init__._promptsg_patched = True
    __init__.fastreid_init = fastreid_init
    cls.__init__ = __init__


# --------------------------------------------------------------------------------------------
# 6. ReidEvaluator compiles the Cython ranker inside site-packages and sys.exit(1)s on failure
# --------------------------------------------------------------------------------------------
def build_cython_ranker(quiet=True):
    """Compile FastReID's Cython rank evaluator in place. Returns True on success.

    Runs ``setup.py build_ext --inplace`` with this interpreter (FastReID's Makefile calls
    whatever ``python3`` is on PATH). Never exits the process: on failure FastReID's pure
    Python ranker, which gives the same numbers more slowly, is used.
    """
    import fastreid.evaluation.rank as rank

    if rank.IS_CYTHON_AVAI:
        return True
    from fastreid.evaluation import rank_cylib

    path = os.path.dirname(os.path.abspath(rank_cylib.__file__))
    try:
        result = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=path, capture_output=quiet, text=True, timeout=600,
        )
        ok = result.returncode == 0
    except (OSError, subprocess.SubprocessError) as exc:
        ok, result = False, exc
    if ok:
        try:
            from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy
        except ImportError as exc:
            ok, result = False, exc
    if not ok:
        detail = getattr(result, "stderr", None) or str(result)
        warnings.warn(
            "FastReID's Cython ranker could not be built in {} ({}); using the Python ranker "
            "(same numbers, slower).".format(path, detail.strip().splitlines()[-1] if detail.strip() else "?")
        )
        return False
    rank.evaluate_cy = evaluate_cy
    rank.IS_CYTHON_AVAI = True
    return True


@_patch
def _evaluator_never_exits():
    import fastreid.evaluation.reid_evaluation as reid_evaluation
    import fastreid.evaluation.rank_cylib as rank_cylib

    def compile_helper():
        build_cython_ranker()

    reid_evaluation.compile_helper = compile_helper
    rank_cylib.compile_helper = compile_helper

    try:  # built at set-up time ("make setup"): pick it up even if rank.py was imported first
        import fastreid.evaluation.rank as rank
        from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy

        rank.evaluate_cy, rank.IS_CYTHON_AVAI = evaluate_cy, True
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------
# 7. Re-ranking calls features.cuda() and faiss GPU resources
# --------------------------------------------------------------------------------------------
@_patch
def _rerank_on_cpu():
    """k-reciprocal re-ranking searches with faiss on the CPU when there is no GPU for faiss."""
    import faiss
    import fastreid.utils.compute_dist as compute_dist

    original = compute_dist.compute_jaccard_distance
    if getattr(original, "_promptsg_patched", False):
        return

    def compute_jaccard_distance(features, k1=20, k2=6, search_option=0, fp16=False):
        if search_option < 3 and not (torch.cuda.is_available() and faiss.get_num_gpus() > 0):
            search_option = 3
        return original(features, k1=k1, k2=k2, search_option=search_option, fp16=fp16)

    compute_jaccard_distance._promptsg_patched = True
    compute_dist.compute_jaccard_distance = compute_jaccard_distance


# --------------------------------------------------------------------------------------------
# 8b. AMPTrainer asserts CUDA (and only knows fp16 + GradScaler)
# --------------------------------------------------------------------------------------------
@_patch
def _amp_where_it_runs():
    """SOLVER.AMP.ENABLED trains with autocast on CUDA (bf16 where supported, else fp16 with a
    GradScaler) and falls back to fp32 with a warning where there is no CUDA."""
    import fastreid.engine.defaults as defaults
    from fastreid.engine.train_loop import SimpleTrainer

    if getattr(defaults.AMPTrainer, "_promptsg_patched", False):
        return

    class AMPTrainer(SimpleTrainer):
        _promptsg_patched = True

        def __init__(self, model, data_loader, optimizer, param_wrapper, grad_scaler=None):
            super().__init__(model, data_loader, optimizer, param_wrapper)
            self.dtype = None
            if not torch.cuda.is_available():
                logger.warning("SOLVER.AMP.ENABLED but CUDA is not available: training in float32.")
            elif torch.cuda.is_bf16_supported():
                self.dtype = torch.bfloat16
            else:
                self.dtype = torch.float16
            use_scaler = self.dtype == torch.float16
            self.grad_scaler = grad_scaler or torch.amp.GradScaler("cuda", enabled=use_scaler)

        def run_step(self):
            if self.dtype is None:
                return super().run_step()
            assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
            t0 = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time = time.perf_counter() - t0
            with torch.autocast("cuda", dtype=self.dtype):
                loss_dict = self.model(data)
                losses = sum(loss_dict.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_scaler.scale(losses).backward()
            self._write_metrics(loss_dict, data_time)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    defaults.AMPTrainer = AMPTrainer


# --------------------------------------------------------------------------------------------
# 8c. launch() uses NCCL + CUDA for more than one process; DDP is built with CUDA device_ids
# --------------------------------------------------------------------------------------------
def _distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args):
    """FastReID's worker, with the gloo backend and no CUDA calls when CUDA is unavailable."""
    import torch.distributed as dist
    from fastreid.utils import comm

    global_rank = machine_rank * num_gpus_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank)
    comm.synchronize()
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        group = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    main_func(*args)


def _ddp(module, device_ids=None, **kwargs):
    """DistributedDataParallel that leaves out ``device_ids`` for a module on the CPU."""
    if next(module.parameters()).device.type == "cpu":
        device_ids = None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


@_patch
def _launch_on_cpu():
    import fastreid.engine.defaults as defaults

    launch = sys.modules["fastreid.engine.launch"]  # the package re-exports a function of that name
    if getattr(launch, "_promptsg_original_worker", None) is None:
        launch._promptsg_original_worker = launch._distributed_worker
    if not torch.cuda.is_available():
        launch._distributed_worker = _distributed_worker
    defaults.DistributedDataParallel = _ddp


# --------------------------------------------------------------------------------------------
# 9. torch.load defaults to weights_only=True (torch >= 2.6)
# --------------------------------------------------------------------------------------------
@_patch
def _checkpoint_load():
    """Load FastReID checkpoints with ``weights_only=True`` first; checkpoints that also pickle
    other objects (NumPy scalars, configs) are trusted local files and are loaded in full. An
    empty, truncated or foreign file is one line naming it (``checkpoint.CheckpointError``)."""
    from fastreid.utils.checkpoint import Checkpointer

    from .checkpoint import CheckpointError

    if getattr(Checkpointer._load_file, "_promptsg_patched", False):
        return

    def _load_file(self, f):
        if os.path.getsize(f) == 0:
            raise CheckpointError(f"{f}: empty file, not a checkpoint")
        try:
            try:
                data = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises UnpicklingError or RuntimeError here
                if "weights_only" not in str(exc) and "Weights only" not in str(exc):
                    raise
                self.logger.info("%s holds non-tensor objects; loading it with weights_only=False", f)
                data = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated zip, not a torch file at all
            raise CheckpointError(f"{f}: not a readable checkpoint ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]})") from None
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise CheckpointError(f"{f}: not a FastReID checkpoint (no 'model' state dict; a CLIP file "
                                  f"belongs in MODEL.CLIP.PRETRAINED)")
        return data

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

    from .checkpoint import CheckpointError, check_compatible, check_mim_fusion, first_non_finite

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
    interrupted save never destroys a checkpoint already on disk; and it refuses weights or
    optimizer state holding NaN or infinity (``checkpoint.check_finite_checkpoint``), so the last
    checkpoint written is the last good one. ``last_checkpoint`` is written atomically too, and
    ``--resume`` finds the newest complete checkpoint even without it."""
    from fastreid.utils.checkpoint import Checkpointer

    from .checkpoint import check_finite_checkpoint, newest_checkpoint, rng_state

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
        tmp_file = save_file + ".tmp"
        torch.save(data, tmp_file)
        os.replace(tmp_file, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        """``last_checkpoint`` written to a temporary file and renamed: a kill mid-write never
        leaves it empty (FastReID writes it in place)."""
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        with open(save_file + ".tmp", "w") as f:
            f.write(last_filename_basename)
        os.replace(save_file + ".tmp", save_file)

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


# --------------------------------------------------------------------------------------------
# --resume restarts the training sampler from its first index
# --------------------------------------------------------------------------------------------
@_patch
def _sampler_skips_on_resume():
    """FastReID's training samplers are infinite streams that restart from their seed whenever the
    loader is iterated anew, so a resumed run saw the first epochs' batches again. A sampler's
    ``skip`` (set by ``checkpoint.resume_training_position``) drops that many of its indices first;
    0 by default, which changes nothing."""
    import itertools

    from fastreid.data import samplers

    for cls in {obj for obj in vars(samplers).values() if isinstance(obj, type)}:
        if not (isinstance(cls, type) and hasattr(cls, "_infinite_indices")):
            continue
        if getattr(cls.__iter__, "_promptsg_patched", False):
            continue

        def __iter__(self, _fastreid_iter=cls.__iter__):
            indices = _fastreid_iter(self)
            skip = getattr(self, "skip", 0)
            yield from itertools.islice(indices, skip, None) if skip else indices

        __iter__._promptsg_patched = True
        cls.__iter__ = __iter__


# --------------------------------------------------------------------------------------------
# SILENT: the evaluator ranks NaN features and reports a metric
# --------------------------------------------------------------------------------------------
@_patch
def _evaluation_refuses_non_finite():
    """``ReidEvaluator.evaluate`` computes distances and a mAP from whatever features it got; NaN
    features rank at random and still print a number. It now stops in one line instead
    (``checkpoint.check_finite_features``, one host read per evaluation)."""
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    from .checkpoint import check_finite_features

    if getattr(ReidEvaluator.evaluate, "_promptsg_patched", False):
        return
    fastreid_evaluate = ReidEvaluator.evaluate

    def evaluate(self):
        if self._predictions:
            check_finite_features(torch.cat([p["feats"] for p in self._predictions]), "test features")
        return fastreid_evaluate(self)

    evaluate._promptsg_patched = True
    ReidEvaluator.evaluate = evaluate


# --------------------------------------------------------------------------------------------
# SILENT: queries the protocol cannot score are dropped from the mean without a word
# --------------------------------------------------------------------------------------------
@_patch
def _evaluation_counts_queries():
    """FastReID's ranker skips a query with no gallery image of its identity from another camera
    and averages over the rest; the results read as if every query counted. The evaluator's
    results now hold ``queries_evaluated`` and ``queries_skipped`` (so do ``results.json`` and
    ``eval_results.json``), and the log says how many were skipped."""
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    from .evaluation import ranked_distances

    if getattr(ReidEvaluator.evaluate, "_promptsg_counts", False):
        return
    fastreid_evaluate = ReidEvaluator.evaluate

    def evaluate(self):
        with ranked_distances() as ranked:
            results = fastreid_evaluate(self)
        if "all_ap" in ranked:    # the process that ranked (the main one)
            total, evaluated = len(ranked["q_pids"]), len(ranked["all_ap"])
            results["queries_evaluated"], results["queries_skipped"] = evaluated, total - evaluated
            logger.log(logging.WARNING if evaluated < total else logging.INFO,
                       "evaluated %d of %d queries%s", evaluated, total,
                       f"; {total - evaluated} skipped: no gallery image of their identity from another camera"
                       if evaluated < total else "")
        return results

    evaluate._promptsg_patched = evaluate._promptsg_counts = True
    ReidEvaluator.evaluate = evaluate


# ============================================================================================
# 12-13. GPU stream races, found by reading FastReID against PyTorch's CUDA
# stream semantics. Streams from PyTorch's pool do not wait for the default stream. FastReID's
# own forward pass used to stop the host (``.item()`` in its accuracy log, ``nonzero()`` in its
# ID loss), which hid both; PromptSG's training step has no such stop, so the host runs ahead of
# the GPU and both races are live. Each has CUDA tests in tests/test_compat.py that keep the GPU
# busy (``torch.cuda._sleep``) while the host reads or frees a tensor: one for the patched code,
# one for FastReID's.
# ============================================================================================

# Devices on which the trainer's loss log waits one step for its values. On the CPU it is written
# at once; tests add "cpu" here to run the waiting path on a machine without a GPU.
DEFERRED_LOSS_LOG_DEVICES = ("cuda",)


# --------------------------------------------------------------------------------------------
# 12. SimpleTrainer._write_metrics reads the losses on a new stream that does not wait for them
# --------------------------------------------------------------------------------------------
@_patch
def _loss_log_reads_written_losses():
    """FastReID copies each loss to the host on a fresh ``torch.cuda.Stream()`` ("so these ops
    don't wait for DDP or backward"). That stream does not wait for the one that computed the
    losses either, so the log can read a loss before the GPU wrote it: a stale value, or garbage
    that trips its NaN check. Here the losses are copied on their own stream without waiting
    (``deferred_log.DeferredLossLog``) and FastReID's ``_write_metrics`` writes them one step
    later, under their own iteration. ``DefaultTrainer.run_step`` writes the last step of each
    epoch at once, so the epoch's checkpoint, evaluation and log lines see every loss (and a NaN
    loss stops training before its epoch is checkpointed). The stop names the first non-finite
    terms and their iteration (``checkpoint.check_finite_losses``), not every term as FastReID's."""
    from fastreid.engine.defaults import DefaultTrainer
    from fastreid.engine.train_loop import SimpleTrainer

    from .checkpoint import check_finite_losses
    from ..utils.deferred_log import DeferredLossLog

    if getattr(SimpleTrainer._write_metrics, "_promptsg_patched", False):
        return
    fastreid_write = SimpleTrainer._write_metrics
    fastreid_run_step = DefaultTrainer.run_step

    def checked_write(self, loss_dict, data_time):
        check_finite_losses(self.iter, loss_dict)      # names the first non-finite terms
        fastreid_write(self, loss_dict, data_time)

    def _write_metrics(self, loss_dict, data_time):
        if next(iter(loss_dict.values())).device.type not in DEFERRED_LOSS_LOG_DEVICES:
            self.flush_metrics()
            checked_write(self, loss_dict, data_time)          # host values: written at once
            return
        previous, self._pending_losses = (getattr(self, "_pending_losses", None),
                                          DeferredLossLog(self.iter, loss_dict, data_time))
        if previous is not None:
            previous.write(self, checked_write)

    def flush_metrics(self):
        """Write the losses still waiting for the next step, if any."""
        pending, self._pending_losses = getattr(self, "_pending_losses", None), None
        if pending is not None:
            pending.write(self, checked_write)

    def run_step(self):
        fastreid_run_step(self)
        if (self.iter + 1) % self.iters_per_epoch == 0 and hasattr(self._trainer, "flush_metrics"):
            self._trainer.flush_metrics()

    _write_metrics._promptsg_patched = True
    SimpleTrainer._write_metrics = _write_metrics
    SimpleTrainer.flush_metrics = flush_metrics
    SimpleTrainer.fastreid_write_metrics = fastreid_write
    DefaultTrainer.run_step = run_step


# --------------------------------------------------------------------------------------------
# 13. DataLoaderX hands out batches copied on its stream without recording their use elsewhere
# --------------------------------------------------------------------------------------------
@_patch
def _loader_batches_kept_until_used():
    """DataLoaderX copies each batch to the GPU on its own stream and makes the training stream
    wait for the copy, but the caching allocator still counts the batch's memory as the copy
    stream's: once the host drops the batch, the copy of a later batch may reuse that memory
    while the training stream has yet to read it. ``record_stream`` on the training stream keeps
    the memory until the GPU got there (the rule in PyTorch's CUDA semantics notes)."""
    from fastreid.data import data_utils

    loader = data_utils.DataLoaderX  # FastReID's class; section 8a's subclass inherits the fix
    if getattr(loader.__next__, "_promptsg_patched", False):
        return
    fastreid_next = loader.__next__

    def __next__(self):
        batch = fastreid_next(self)
        stream = torch.cuda.current_stream()
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(stream)
        return batch

    __next__._promptsg_patched = True
    __next__.fastreid_next = fastreid_next
    loader.__next__ = __next__


def apply_all():
    """Apply every patch once, in order. Safe to call more than once."""
    for fn in _PATCHES:
        fn()
        if fn.patch_name not in APPLIED:
            APPLIED.append(fn.patch_name)
    return list(APPLIED)


# The import aliases must exist before anything imports fastreid.
_import_aliases()
apply_all()
