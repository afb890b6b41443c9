"""A small Python API: load a trained run, embed images as the evaluation does, search a gallery.

    import promptsg
    run = promptsg.load("logs/synthetic/promptsg_small_vit")       # its config.yaml and model_final.pth
    features = run.embed("datasets/SyntheticMarket/query")         # (N, D) float32, one row per image
    hits = run.search("wanted/", "camera1/", top_k=5)              # for each query, its 5 closest images
    hits = run.search("wanted/", "camera1/", words="carrying a red backpack")   # PromptSG: image + words

Images go through exactly what ``tools/train_net.py --eval-only`` does with a test set and what
``tools/extract_features.py`` writes (``promptsg.inference``): the same features, the same
distances (TEST.METRIC, TEST.AQE and TEST.RERANK of the run's config), the same rankings.

A gallery searched many times is embedded once into a faiss index (``promptsg.gallery_index``):

    index = run.build_index(["camera1/", "camera2/"])              # exact; factory="IVF4096,Flat", "HNSW32", ...
    index.save("gallery_index.npz")                                # faiss index, image list, model fingerprint
    index = run.load_index("gallery_index.npz")                    # refused unless this model built it
    hits = index.search("wanted/", k=5)                            # as run.search ranks (TEST.METRIC alone)
    added, skipped = index.add("camera3/")                         # new images; known paths are skipped

``index.search`` also takes an (Q, D) array of ``run.embed`` features; with the default exact
index it gives ``run.search``'s images and distances (without TEST.AQE and TEST.RERANK, which
need every query-gallery distance).
"""
import os

import torch

from .engine.checkpoint import load_for_inference
from .engine.preflight import InputError, load_checkpoint_config, sie_camera
from .gallery_index import GalleryIndex
from .inference import API_NAMES, check_text_search, embed_and_rank, image_paths, ranking, text_queries

__all__ = ["GalleryIndex", "Run", "load"]


def load(path, weights=None, opts=(), device=None, camera=None):
    """A trained run, its checkpoint loaded whole.

    ``path``: an OUTPUT_DIR of ``tools/train_net.py`` (its ``config.yaml``; the weights default to
    its ``model_final.pth``) or a config file (then give ``weights``, or MODEL.WEIGHTS in ``opts``).
    ``opts``: KEY VALUE config overrides. ``device``: default the config's, or the CPU when it
    names CUDA and there is none. ``camera``: the training camera index for models with SIE
    (MODEL.CLIP.SIE_CAMERA).
    """
    opts = [str(o) for o in opts]
    weights = weights or dict(zip(opts[::2], opts[1::2])).get("MODEL.WEIGHTS")
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.yaml")
        weights = weights or os.path.join(path, "model_final.pth")
    else:
        config_file = path
        if weights is None:
            raise InputError(f"{path} is a config file: give the checkpoint too (weights=..., or MODEL.WEIGHTS in opts)")
    opts = [*opts, "MODEL.WEIGHTS", str(weights)]
    if device is not None:
        opts += ["MODEL.DEVICE", device]
    cfg = load_checkpoint_config(config_file, opts)
    if device is None and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    camera = sie_camera(cfg, camera, "camera=")
    cfg.TEST.ROC.ENABLED = False          # new images carry no identity labels
    cfg.freeze()
    from .engine.trainer import Trainer

    model = Trainer.build_model(cfg)
    load_for_inference(model, cfg.MODEL.WEIGHTS)
    return Run(cfg, model, camera)


class Run:
    """A trained model with its config (``cfg``, frozen) and the camera index its images get."""

    def __init__(self, cfg, model, camera=0):
        self.cfg, self.model, self.camera = cfg, model, camera

    def embed(self, images, bf16=False):
        """The model's features of ``images`` (a folder, a path, or a list of them): an (N, D)
        float32 array, one row per image in the order given (a folder's images sorted)."""
        paths = image_paths(images, "images")
        return embed_and_rank(self.cfg, self.model, [], paths, self.camera, bf16)[1]

    def search(self, query, gallery, top_k=10, words=None):
        """For each query image, its ``top_k`` closest gallery images, closest first:
        ``[{"query": path, "top": [{"image": path, "distance": d}, ...]}, ...]``, the distances
        FastReID's evaluator computes. ``words``: PromptSG's text-aware search, each query's MIM
        query the composed prompt "A photo of a s* person <words>." (the entries get "prompt")."""
        query_paths, gallery_paths = image_paths(query, "query"), image_paths(gallery, "gallery")
        model, prompts = self.model, None
        if words is not None:
            from .analysis.text_search import WordsQueries

            check_text_search(self.cfg, with_query=True, config_file="its config", names=API_NAMES)
            text = text_queries(self.cfg, query_paths, text=words, text_flag="words=")
            model, prompts = WordsQueries(self.model, text.words), text.prompts
        _, _, dist = embed_and_rank(self.cfg, model, query_paths, gallery_paths, self.camera)
        return ranking(dist, query_paths, gallery_paths, top_k, prompts)

    def build_index(self, images, factory="Flat", params=""):
        """A GalleryIndex of ``images`` (a folder, a path, or a list of them) for many searches:
        ``factory`` a faiss index_factory string ("Flat": exact; "IVF4096,Flat", "HNSW32",
        "IVF4096,PQ64np"), ``params`` its search parameters ("nprobe=16", "efSearch=128")."""
        return GalleryIndex.build(self, images, factory, params)

    def load_index(self, path, params=None):
        """The GalleryIndex saved at ``path``; refused (InputError) unless this model built it."""
        return GalleryIndex.load(path, self, params)
