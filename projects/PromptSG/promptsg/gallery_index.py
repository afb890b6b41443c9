"""A faiss index over a gallery's features: embedded once, searched many times, extended with new images.

    index = run.build_index("/data/cam1")          # exact search (faiss "Flat") by default
    index.save("gallery_index.npz")                # one file: faiss index, image list, model fingerprint
    index = run.load_index("gallery_index.npz")    # refused for another model
    hits = index.search("/data/wanted", k=10)      # as Run.search ranks, without AQE and re-ranking
    added, skipped = index.add("/data/cam2")       # images already in it are skipped

Images are embedded as ``Run.embed`` embeds them (FastReID's test path) and ranked by
FastReID's distance for the run's TEST.METRIC: "cosine" searches the inner product of L2-normalised
features and reports 1 - cosine, "euclidean" the squared L2 distance, as FastReID's ``build_dist``
computes them. TEST.AQE and TEST.RERANK need every query-gallery distance and are not applied.
``factory`` is faiss's ``index_factory`` string: "Flat" (exact), "IVF4096,Flat", "HNSW32",
"IVF4096,PQ64np", "PQ64np" (PQ codes; "np" skips faiss's polysemous training, which only
Hamming-filtered search uses and which takes minutes); ``params`` its search parameters
("nprobe=16", "efSearch=128"). Index types faiss has on the GPU (Flat, IVF) run there when faiss
sees one; the others stay on the CPU. Approximate indexes are trained on the images they are
built over; images added later use that training (rebuild when the gallery has changed much).

An index stores the images as absolute paths (row i of the faiss index is ``images[i]``; an
image is known by its resolved path, so one already in the index, also when reached through a
symbolic link, is skipped by ``add``) and the
fingerprint of the model that embedded them: the weights that compute the feature (the ID
classifier aside) and the settings that change a feature without being a weight
(``FEATURE_SETTINGS`` and the SIE camera index). Searching it with another model's features would
give a ranking without meaning, so loading it with another model is refused.
"""
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import zipfile
from typing import NamedTuple

try:
    import fcntl
except ImportError:   # not a POSIX system: index files are not locked
    fcntl = None

import faiss
import numpy as np
import torch

from .engine.checkpoint import CLASSIFIER_KEYS
from .engine.preflight import InputError
from .inference import embed_and_rank, image_paths, write_atomic

logger = logging.getLogger(__name__)

FORMAT = "promptsg-gallery-index-1"
METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "euclidean": faiss.METRIC_L2}
# Config keys that change a feature or its distance without being a weight (a key a config
# lacks, such as MODEL.PROMPTSG in FastReID's baselines, counts as None).
FEATURE_SETTINGS = (
    "MODEL.META_ARCHITECTURE",
    "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD",                          # image normalisation
    "INPUT.SIZE_TEST", "INPUT.CROP.ENABLED", "INPUT.CROP.SIZE",     # test transforms
    "TEST.FLIP.ENABLED",                                            # flip test: mean with the mirror
    "TEST.METRIC",                                                  # the distance ranked by
    "MODEL.BACKBONE.LAST_STRIDE", "MODEL.CLIP.STRIDE", "MODEL.CLIP.SIE_COE",
    "MODEL.HEADS.NECK_FEAT", "MODEL.HEADS.POOL_LAYER",              # which feature, pooled how
    "MODEL.PROMPTSG.INFERENCE_PROMPT", "MODEL.PROMPTSG.PROMPT", "MODEL.PROMPTSG.SIMPLE_PROMPT",
    "MODEL.PROMPTSG.FEATURE", "MODEL.PROMPTSG.MIM.QUERY", "MODEL.PROMPTSG.MIM.FUSION",
)


def faiss_message(exc):
    """A faiss RuntimeError's message without its "Error in <function> at <file>:<line>:" prefix."""
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", " ".join(str(exc).split()))


class Fingerprint(NamedTuple):
    """What makes a model's features: ``weights`` (sha256 of the state dict without the ID
    classifier) and ``settings`` (FEATURE_SETTINGS' values and the camera index)."""
    weights: str
    settings: dict

    @property
    def digest(self):
        text = self.weights + json.dumps(self.settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def differences(self, other):
        """What differs from ``other``, in words."""
        found = ["the weights"] if self.weights != other.weights else []
        found += [f"{key} {self.settings.get(key)!r} vs {other.settings.get(key)!r}"
                  for key in sorted(set(self.settings) | set(other.settings))
                  if self.settings.get(key) != other.settings.get(key)]
        return "; ".join(found)


def _setting(cfg, key):
    node = cfg
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def fingerprint(cfg, model, camera=0):
    """The Fingerprint of ``model`` (built from ``cfg``, its images given camera index ``camera``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in CLASSIFIER_KEYS:
            continue                                    # left out at load, unused by the feature
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    settings = {key: _setting(cfg, key) for key in FEATURE_SETTINGS}
    settings["camera"] = camera
    return Fingerprint(digest.hexdigest(), json.loads(json.dumps(settings)))   # tuples as JSON lists


@functools.lru_cache(maxsize=None)
def gpu_resources():
    """faiss's GPU memory and streams, one set per process."""
    return faiss.StandardGpuResources()


class FeatureIndex:
    """A faiss index of (N, D) features under FastReID's distance for ``metric``, rows numbered
    in the order added; on the first GPU when faiss sees one and has the index type there."""

    def __init__(self, index, metric, factory, params=""):
        self.metric, self.factory, self.on_gpu = metric, factory, False
        if faiss.get_num_gpus() > 0:
            try:
                index, self.on_gpu = faiss.index_cpu_to_gpu(gpu_resources(), 0, index), True
            except RuntimeError as exc:
                logger.info("faiss index %s stays on the CPU: %s", factory, faiss_message(exc))
        self.index = index
        self.set_params(params)

    @classmethod
    def create(cls, dim, metric="cosine", factory="Flat", params=""):
        if metric not in METRICS:
            raise InputError(f"TEST.METRIC {metric}: an index ranks by {' or '.join(METRICS)}")
        try:
            index = faiss.index_factory(dim, factory, METRICS[metric])
        except RuntimeError as exc:
            raise InputError(f"index {factory!r} for {dim}-d features: {faiss_message(exc)} (give a faiss "
                             f"index_factory string: Flat, IVF4096,Flat, IVF4096,PQ64np, HNSW32)") from None
        return cls(index, metric, factory, params)

    def set_params(self, params):
        """Search parameters in faiss's ParameterSpace syntax: "nprobe=16", "efSearch=128"."""
        self.params = params
        if params:
            space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
            try:
                space.set_index_parameters(self.index, params)
            except RuntimeError as exc:
                raise InputError(f"index {self.factory!r}: search parameters {params!r}: "
                                 f"{faiss_message(exc)}") from None

    def __len__(self):
        return self.index.ntotal

    def prepared(self, features):
        """``features`` as faiss takes them: a float32 (N, D) copy, L2-normalised for cosine."""
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float32).numpy()
        x = np.array(features, dtype=np.float32, order="C", copy=True)
        if x.ndim != 2 or x.shape[1] != self.index.d:
            raise InputError(f"features of shape {x.shape}: the index holds {self.index.d}-d features")
        if self.metric == "cosine":
            faiss.normalize_L2(x)
        return x

    def train(self, features):
        """Train an IVF or PQ index on ``features`` (``add`` trains an untrained index on its first)."""
        x = self.prepared(features)
        try:
            self.index.train(x)
        except RuntimeError as exc:
            raise InputError(f"index {self.factory!r} cannot be trained on {len(x)} features: "
                             f"{faiss_message(exc)}") from None

    def add(self, features, chunk=65536):
        """Append ``features``' rows, ``chunk`` rows at a time (one normalised copy of a chunk in
        memory, not of them all)."""
        if not self.index.is_trained:
            self.train(features)
        for start in range(0, len(features), chunk):
            self.index.add(self.prepared(features[start:start + chunk]))

    def search(self, features, k):
        """(distances, rows), each (Q, min(k, N)), closest first; row -1 where an approximate
        index found fewer than k."""
        scores, rows = self.index.search(self.prepared(features), min(k, len(self)))
        return (1 - scores if self.metric == "cosine" else scores), rows

    def serialize(self):
        return faiss.serialize_index(faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index)


def embed(run, paths):
    return embed_and_rank(run.cfg, run.model, [], paths, run.camera)[1]


def _check_ranking(cfg):
    skipped = [key for key, on in (("TEST.AQE", cfg.TEST.AQE.ENABLED), ("TEST.RERANK", cfg.TEST.RERANK.ENABLED)) if on]
    if skipped:
        logger.warning("the gallery index ranks by TEST.METRIC %s alone: %s need every query-gallery distance "
                       "and are not applied", cfg.TEST.METRIC, " and ".join(skipped))


class GalleryIndex:
    """A gallery's features in a FeatureIndex (``features``), its images (``images``, absolute
    paths, in row order), the Fingerprint of the model that embedded them, and that model
    (``run``: a ``promptsg.Run``), which embeds added images and query images."""

    def __init__(self, run, features, images, fingerprint):
        self.run, self.features, self.images, self.fingerprint = run, features, images, fingerprint

    @classmethod
    def build(cls, run, images, factory="Flat", params=""):
        """An index of ``images`` (a folder, a path, or a list of them; an image reached twice,
        by two paths or a symbolic link, counted once)."""
        _check_ranking(run.cfg)
        paths, _ = new_images(images)
        # the index type and its parameters are checked on one image's feature size before all are embedded
        features = FeatureIndex.create(embed(run, paths[:1]).shape[1], run.cfg.TEST.METRIC, factory, params)
        features.add(embed(run, paths))
        return cls(run, features, paths, fingerprint(run.cfg, run.model, run.camera))

    def __len__(self):
        return len(self.images)

    def add(self, images):
        """Embed and append the images (a folder, a path, or a list of them) not in the index yet,
        each known by its resolved path (a folder reached through a symbolic link adds nothing
        twice). Returns (added, skipped): the absolute paths appended, and those already in it."""
        added, skipped = new_images(images, self.images)
        if added:
            self.features.add(embed(self.run, added))
            self.images += added
        return added, skipped

    def search(self, query, k=10):
        """For each query, its ``k`` closest gallery images, closest first, in ``Run.search``'s form:
        ``[{"query": q, "top": [{"image": path, "distance": d}, ...]}, ...]``. ``query``: images (a
        folder, a path, or a list of them; q is the path) or an (Q, D) array of this model's
        features (q is the row)."""
        if isinstance(query, (np.ndarray, torch.Tensor)):
            names, features = list(range(len(query))), query
        else:
            names = image_paths(query, "query")
            features = embed(self.run, names)
        distances, rows = self.features.search(features, k)
        return [{"query": name, "top": [{"image": self.images[r], "distance": float(d)}
                                        for d, r in zip(distances[q], rows[q]) if r >= 0]}
                for q, name in enumerate(names)]

    def save(self, path):
        """Write the index to one file (a NumPy .npz archive), whole or not at all."""
        meta = {"format": FORMAT, "fingerprint": self.fingerprint.digest, "weights": self.fingerprint.weights,
                "settings": self.fingerprint.settings, "metric": self.features.metric,
                "factory": self.features.factory, "params": self.features.params}
        members = {"index": self.features.serialize(), "images": _json_bytes(self.images), "meta": _json_bytes(meta)}
        write_atomic(os.fspath(path), lambda f: np.savez(f, **members))

    @classmethod
    def load(cls, path, run, params=None):
        """The index saved at ``path``, to be searched with ``run``, which must be the model that built
        it; ``params``: other search parameters than the saved ones."""
        path = os.fspath(path)
        meta, images, data = _read(path)
        built_by = Fingerprint(meta["weights"], meta["settings"])
        model = fingerprint(run.cfg, run.model, run.camera)
        if built_by.digest != meta["fingerprint"]:
            raise InputError(f"{path} is corrupt: its fingerprint {meta['fingerprint'][:16]} does not match its "
                             f"weights and settings")
        if model.digest != built_by.digest:
            raise InputError(f"{path} was built by another model: index fingerprint {built_by.digest[:16]}, this "
                             f"model's {model.digest[:16]} (index vs model: {built_by.differences(model)}); rebuild it "
                             f"with this model or load the model that built it")
        try:
            index = faiss.deserialize_index(data)
        except RuntimeError as exc:
            raise InputError(f"{path}: its faiss index is corrupt ({faiss_message(exc)})") from None
        if index.ntotal != len(images):
            raise InputError(f"{path} is corrupt: its faiss index holds {index.ntotal} features for "
                             f"{len(images)} images")
        _check_ranking(run.cfg)
        features = FeatureIndex(index, meta["metric"], meta["factory"], meta["params"] if params is None else params)
        return cls(run, features, images, model)


def new_images(images, known=()):
    """(new, skipped): the absolute paths of ``images`` (a folder, a path, or a list of them) whose
    resolved path is neither in ``known`` nor met before in ``images``, and the others."""
    seen = {os.path.realpath(p) for p in known}
    new, skipped = [], []
    for path in map(os.path.abspath, image_paths(images, "images")):
        real = os.path.realpath(path)
        (skipped if real in seen else new).append(path)
        seen.add(real)
    return new, skipped


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on the index file ``path`` (``PATH.lock``, flock) for a read-modify-write:
    two adds at once run one after the other, so neither's images are lost. Waits for a holder."""
    if fcntl is None:
        yield
        return
    with open(os.fspath(path) + ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.info("%s is being changed by another process: waiting for it", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_to_file(run, path, images, params=None):
    """Add ``images`` to the index saved at ``path`` under its lock, and save it (atomically) if
    any was new. Returns (index, added, skipped)."""
    with locked(path):
        index = GalleryIndex.load(path, run, params)
        added, skipped = index.add(images)
        if added:
            index.save(path)
    return index, added, skipped


def build_file(run, path, images, factory="Flat", params="", overwrite=False):
    """Build an index of ``images`` and save it at ``path``, under its lock; an index already
    there is replaced only with ``overwrite``."""
    with locked(path):
        if os.path.exists(path) and not overwrite:
            raise InputError(f"{path} already exists: add images to it with `add`, or replace it with --overwrite")
        index = GalleryIndex.build(run, images, factory, params)
        index.save(path)
    return index


def _read(path):
    """(meta, images, serialised faiss index) of the file at ``path``, with one-line errors."""
    if not os.path.isfile(path):
        raise InputError(f"gallery index not found: {path}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a readable gallery index (not a whole .npz archive: truncated, or "
                         f"another kind of file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta, images = json.loads(archive["meta"].tobytes()), json.loads(archive["images"].tobytes())
            data = archive["index"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError, AttributeError) as exc:
        raise InputError(f"{path} is not a readable gallery index ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"{path} is not a gallery index of this version (format {found!r}, expected {FORMAT!r})")
    missing = [key for key in ("fingerprint", "weights", "settings", "metric", "factory", "params") if key not in meta]
    if missing or not isinstance(images, list):
        raise InputError(f"{path} is corrupt: {'no ' + ', '.join(missing) if missing else 'no image list'}")
    return meta, images, data


def _json_bytes(value):
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
