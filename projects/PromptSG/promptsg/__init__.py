"""PromptSG (CVPR 2024) for FastReID.

Importing this package patches the installed FastReID for today's stack (``compat``) and
registers PromptSG's components in FastReID's registries:

    BACKBONE_REGISTRY   build_clip_backbone   clip_backbone.py
    REID_HEADS_REGISTRY PromptSGHead          heads.py
    META_ARCH_REGISTRY  PromptSG              meta_arch.py
    DATASET_REGISTRY    SyntheticMarket       datasets/synthetic.py

and offers a small Python API (``api.py``): ``promptsg.load(run_dir)`` gives a trained run whose
``embed(images)`` and ``search(query, gallery, words=...)`` work as the evaluation does.
"""
from . import compat  # noqa: F401  (first: FastReID does not import without it)
from . import clip_backbone, datasets, heads, meta_arch  # noqa: F401  (registration)
from .api import Run, load
from .config import add_promptsg_config

__all__ = ["Run", "add_promptsg_config", "load"]
