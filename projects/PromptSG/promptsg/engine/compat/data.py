"""FastReID's data side: transforms, read_image, the loaders and the identity samplers."""
import multiprocessing
import os
import types

import numpy as np
import torch
from PIL import Image, ImageOps

from .patch import _patch


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
# 13. DataLoaderX hands out batches copied on its stream without recording their use elsewhere
#     (the second GPU stream race: the comment of sections 12-13 is in training.py)
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


# --------------------------------------------------------------------------------------------
# MSMT17 reads list_val.txt even when DATASETS.COMBINEALL is off and its images go unused
# --------------------------------------------------------------------------------------------
@_patch
def _msmt17_val_list_optional():
    """FastReID's MSMT17 reader opens ``list_val.txt`` whatever ``combineall`` says, so a folder
    without it fails with a traceback though no val image would be used. Without the file it now
    reads no val images; ``data.real_datasets`` refuses a missing one when COMBINEALL needs it."""
    from fastreid.data.datasets.msmt17 import MSMT17

    if getattr(MSMT17.process_dir, "_promptsg_patched", False):
        return
    fastreid_process_dir = MSMT17.process_dir

    def process_dir(self, dir_path, list_path, is_train=True):
        if os.path.basename(list_path) == "list_val.txt" and not os.path.isfile(list_path):
            return []
        return fastreid_process_dir(self, dir_path, list_path, is_train)

    process_dir._promptsg_patched = True
    MSMT17.process_dir = process_dir
