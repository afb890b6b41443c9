"""Compatibility patches for the PyPI ``fastreid==1.4.0`` wheel on Python 3.11, torch 2.x, NumPy 2.

The wheel targets Python <= 3.9 and torch 1.13. This package applies one small, named patch per
known breakage of the wheel that affects this project (docs/FASTREID_COMPAT.md lists them), two
GPU stream races found here (sections 12-13), and the silent wrong results inside FastReID's own
functions that no extension point reaches (image modes read as grey, other batches for each
number of processes), and nothing else. What the project adds to FastReID (the evaluator in query
chunks, whole and atomic checkpoints, the resume position, merged optimizer groups) is not here:
it extends FastReID's classes at their extension points (``engine/trainer.py``).
``import promptsg`` applies them before any FastReID module is imported; every patch is idempotent
and has a regression test that fails without it (``tests/test_compat.py``, ``tests/test_faults.py``,
``tests/test_distributed.py``).

One module per area of FastReID (the numbers are those of the patches' section comments):

    imports.py      the names FastReID imports that are gone (1-2)
    solver.py       the optimizer it builds (4)
    data.py         transforms, read_image, the loaders, the samplers and MSMT17's lists (5, 8a, 13)
    evaluation.py   the Cython ranker and re-ranking (6, 7)
    training.py     the AMP trainer and the trainer's loss log (8b, 12)
    launch.py       launch() and DDP without CUDA (8c)
    checkpoint.py   reading checkpoint files (9)

A patch is a function marked ``@_patch`` (``patch.py``) in the module of its area, and one line
in ``_PATCHES`` below, which applies them in one order across the modules.

Breakages that need no patch on our stack:
  * ``np.bool`` (evaluation/rank.py): NumPy >= 2.0 defines ``np.bool`` again; requirements pin NumPy 2.
  * upstream ``tools/`` and ``demo/`` scripts: not in the wheel; this project ships its own tools.
"""
from .checkpoint import _checkpoint_load
from .data import (_cpu_data_loader, _global_batches, _loader_batches_kept_until_used, _msmt17_val_list_optional,
                   _random_affine_keywords, _read_image_rgb, _test_loader_workers, image_to_rgb,
                   worker_start_method)
from .evaluation import _evaluator_never_exits, _rerank_on_cpu, build_cython_ranker
from .imports import _import_aliases
from .launch import _distributed_worker, _launch_on_cpu
from .solver import _optimizer_not_contiguous
from .training import _amp_where_it_runs, _loss_log_reads_written_losses

APPLIED = []  # names of the patches applied in this process, in order
_PATCHES = (  # the patch functions, in the order they are applied
    _import_aliases,
    _optimizer_not_contiguous,
    _random_affine_keywords,
    _read_image_rgb,
    _cpu_data_loader,
    _test_loader_workers,
    _global_batches,
    _evaluator_never_exits,
    _rerank_on_cpu,
    _amp_where_it_runs,
    _launch_on_cpu,
    _checkpoint_load,
    _loss_log_reads_written_losses,
    _loader_batches_kept_until_used,
    _msmt17_val_list_optional,
)


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
