"""PromptSG (CVPR 2024) for FastReID.

The package, by layer (a module imports only from its own layer and those above it in this
list; ``tests/test_layout.py`` checks it):

    utils/      global-batch operations, loss logging without host reads, records, InputError
    modeling/   the paper: CLIP towers, f_theta, prompt, SupCon, MIM, head, meta-architecture;
    config.py   beside it, PromptSG's config keys (``add_promptsg_config``)
    engine/     FastReID glue: the Trainer (trainer.py) and the evaluator, checkpointer and
                optimizer it builds; compat patches for the wheel; start-up checks, output-folder
                lock, launching under torchrun or srun
    data/       the synthetic dataset (Market-1501 layout, or any real layout) and its caption
                pool; the real datasets' start-up checks and variants (real_datasets.py)
    analysis/   attention maps, text-aware search
    export/     ONNX
    inference.py, api.py   embedding new images and searching, as the evaluation does;
    gallery_index.py       beside inference.py, a faiss index of a gallery, searched many times

Importing it patches the installed FastReID for today's stack (``engine/compat/``) and
registers PromptSG's components in FastReID's registries:

    BACKBONE_REGISTRY   build_clip_backbone   modeling/clip_backbone.py
    REID_HEADS_REGISTRY PromptSGHead          modeling/heads.py
                        CLIPReIDHead          modeling/clip_reid.py
    META_ARCH_REGISTRY  PromptSG              modeling/meta_arch.py
                        CLIPReID              modeling/clip_reid.py (its stage 1: engine/prompt_stage.py)
    DATASET_REGISTRY    SyntheticMarket       data/synthetic/registration.py
                        CUHK03Detected        data/real_datasets.py

and offers a small Python API (``api.py``): ``promptsg.load(run_dir)`` gives a trained run whose
``embed(images)`` and ``search(query, gallery, words=...)`` work as the evaluation does, and
whose ``build_index(images)`` and ``load_index(path)`` give a ``GalleryIndex`` to search many times.
"""
from .engine import compat  # noqa: F401  (first: FastReID does not import without it)
from .modeling import clip_backbone, clip_reid, heads, meta_arch  # noqa: F401  (registration)
from . import data  # noqa: F401  (registration: SyntheticMarket)
from .api import GalleryIndex, Run, load
from .config import add_promptsg_config

__all__ = ["GalleryIndex", "Run", "add_promptsg_config", "load"]
