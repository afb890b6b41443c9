"""A trained model's retrieval feature as an ONNX graph, and that graph run by onnxruntime.

The graph (``FeatureGraph``) takes what FastReID's test transforms give, a float32 batch of raw
RGB images in 0-255, (B, 3, H, W) at INPUT.SIZE_TEST, and returns the (B, D) feature that
FastReID's evaluation ranks: the model's eval-mode forward (normalisation by MODEL.PIXEL_MEAN /
PIXEL_STD inside the graph), averaged with that of the mirrored image when TEST.FLIP.ENABLED,
as ``fastreid.evaluation.inference_on_dataset`` averages them. The batch axis is dynamic.

PromptSG with the simplified test prompt holds the prompt's text embedding as a constant: the
text encoder is not in the graph. With the composed prompt (MODEL.PROMPTSG.INFERENCE_PROMPT
composed) the inversion network and the text encoder run per image inside the graph; the
prompt's fixed word embeddings are folded to constants, so the token-embedding table is not in it
either. FastReID's own meta-architectures export where their layers do: FastReID's Baseline with
the BoT, AGW and SBS ResNets and the BoT ViT of configs/ does.

The graph is written by ``torch.onnx.export`` (the torch.export-based exporter) and checked by
``onnx.checker``; ``export_checked`` writes it only once onnxruntime reproduces PyTorch's
features. ``OnnxFeatures`` runs it with onnxruntime behind the interface of a FastReID model, so
FastReID's evaluation can score it unchanged.
"""
import logging
import os

import numpy as np
import torch
from torch import nn

from ..engine.preflight import InputError, check_datasets, check_output_dir, load_checkpoint_config, sie_camera

# The ONNX operator set written: LayerNormalization needs 17; 18 runs on onnxruntime >= 1.14.
OPSET = 18
# The batch the graph is traced with. torch.export treats sizes 0 and 1 as special cases, so a
# batch of 2 keeps the batch axis general; the graph then runs any batch size from 1 up.
EXPORT_BATCH = 2
# The agreement with PyTorch an exported graph must reach on every image of the check batch.
MIN_COSINE = 0.9999


class ExportError(RuntimeError):
    """The model does not export to ONNX, or its graph disagrees with PyTorch."""


class FeatureGraph(nn.Module):
    """What the exported graph computes: raw 0-255 RGB images (B, 3, H, W) -> features (B, D).

    Args:
        model: a FastReID meta-architecture (PromptSG or FastReID's own) in eval mode.
        flip: average the features of each image and its horizontal mirror (TEST.FLIP.ENABLED).
        camera: the SIE camera index every image gets (models with MODEL.CLIP.SIE_CAMERA), else None.
    """

    def __init__(self, model, flip=False, camera=None):
        super().__init__()
        self.model = model
        self.flip = flip
        self.camera = camera

    def forward(self, images):
        batch = images.shape[0]
        if self.flip:
            # The images and their mirrors in one batch: one copy of the model in the graph
            # (eval mode has no batch-dependent layer, so the halves are the two calls' results).
            images = torch.cat([images, images.flip(dims=[3])])
        else:
            images = images.clone()      # FastReID's Baseline normalises its input batch in place
        inputs = {"images": images}
        if self.camera is not None:
            inputs["camids"] = torch.full((images.shape[0],), self.camera, dtype=torch.long)
        features = self.model(inputs)
        if self.flip:
            features = (features[:batch] + features[batch:]) / 2
        return features


def feature_graph(cfg, model, camera=None):
    """``model`` (loaded, any device) as the FeatureGraph of ``cfg``, in eval mode on the CPU.

    One eager forward pass runs first: it fills the model's caches (PromptSG's simplified prompt
    embedding), so that the exporter records them as constants rather than tracing the text
    encoder that computed them.
    """
    model = model.to("cpu").eval()
    graph = FeatureGraph(model, flip=cfg.TEST.FLIP.ENABLED, camera=camera).eval()
    with torch.no_grad():
        graph(example_images(cfg, EXPORT_BATCH))
    return graph


def example_images(cfg, batch, seed=0):
    """(batch, 3, H, W) float32 images of uniform noise in 0-255 at INPUT.SIZE_TEST."""
    generator = torch.Generator().manual_seed(seed)
    height, width = cfg.INPUT.SIZE_TEST
    return torch.rand(batch, 3, height, width, generator=generator) * 255


def export(graph, images, path):
    """Write ``graph`` traced on ``images`` to ``path`` as one self-contained .onnx file, with a
    dynamic batch axis (input ``images``, output ``features``); checked by onnx.checker."""
    import onnx
    import onnxscript.optimizer

    for name in ("onnxscript", "torch.onnx", "torch.export"):   # its per-pass progress lines
        logging.getLogger(name).setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(graph, (images,), None, dynamo=True, opset_version=OPSET,
                                    input_names=["images"], output_names=["features"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    # The exporter folds operations on constants of at most 8192 elements. The composed prompt's
    # word embeddings are a lookup of fixed token ids in the (49408, D) token-embedding table:
    # fold operations on any constant whose result is that small, so the table leaves the graph
    # (small results only: folding a weight's transpose or reshape would store it twice).
    largest = max((p.numel() for p in graph.parameters()), default=0)
    onnxscript.optimizer.optimize(program.model, input_size_limit=max(largest, 8192), output_size_limit=8192)
    program.save(path, external_data=False)
    onnx.checker.check_model(path, full_check=True)


def session(path, threads=None, spinning=True):
    """An onnxruntime CPU session of the .onnx file ``path`` (``threads``: intra-op threads;
    ``spinning=False``: its idle threads sleep at once instead of spinning, leaving the CPUs to
    other work, as when it alternates with PyTorch in a benchmark)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3   # errors only
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(sess, images):
    """The graph's features (B, D) float32 NumPy array of ``images`` (a tensor or an array)."""
    images = images.numpy() if torch.is_tensor(images) else images
    return sess.run(["features"], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


def agreement(reference, features):
    """(max abs difference, per-row cosine similarity) of two (N, D) feature arrays."""
    reference, features = np.asarray(reference, np.float64), np.asarray(features, np.float64)
    cosine = (reference * features).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(features, axis=1))
    return float(np.abs(reference - features).max()), cosine


class OnnxFeatures(nn.Module):
    """An exported graph with the interface of a FastReID model in eval mode: called with a batch
    dict (or an image tensor), returns the (B, D) features as a CPU tensor. The graph already
    holds the flip test: evaluate it with ``flip_test=False``."""

    def __init__(self, sess):
        super().__init__()
        self.sess = sess

    def forward(self, batched_inputs):
        images = batched_inputs["images"] if isinstance(batched_inputs, dict) else batched_inputs
        return torch.from_numpy(run(self.sess, images.to("cpu", torch.float32)))


def remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def export_config(config_file, opts, output, weights=None, camera=None, evaluate=False):
    """(config, camera index, test set or None) of an export to ``output``, checked before anything
    is built: ``weights`` (else MODEL.WEIGHTS among ``opts``), the SIE ``camera`` every image gets
    (models with MODEL.CLIP.SIE_CAMERA), the first of DATASETS.TESTS when ``evaluate``."""
    opts = list(opts) + (["MODEL.WEIGHTS", weights] if weights else [])
    cfg = load_checkpoint_config(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"              # the graph is traced on the CPU; ONNX has no device
    if "PROMPTSG" in cfg.MODEL:
        cfg.MODEL.PROMPTSG.COMPILE = ""   # torch.compile changes no result; the exporter traces eager code
    if "CLIP" in cfg.MODEL and cfg.MODEL.CLIP.SIE_CAMERA:
        camera = sie_camera(cfg, camera)
        if evaluate:
            raise InputError("--evaluate needs each test image's own camera; with MODEL.CLIP.SIE_CAMERA the "
                             "graph gives every image the --camera embedding")
    else:
        camera = None
    check_output_dir(os.path.dirname(os.path.abspath(output)), "--output folder")
    dataset = None
    if evaluate:
        if not cfg.DATASETS.TESTS:
            raise InputError(f"{config_file}: DATASETS.TESTS is empty: --evaluate has no test set")
        dataset = cfg.DATASETS.TESTS[0]
        test_only = cfg.clone()
        test_only.DATASETS.NAMES, test_only.DATASETS.TESTS = (), (dataset,)   # no training data needed
        check_datasets(test_only, os.getenv("FASTREID_DATASETS", "datasets"))
    cfg.freeze()
    return cfg, camera, dataset


def export_checked(cfg, graph, output, check_batch):
    """Export ``graph`` to ``output`` once onnxruntime reproduces PyTorch on ``check_batch``
    images; returns (max abs difference, min cosine, feature width). Nothing is written when
    either fails."""
    tmp = output + ".tmp"
    try:
        try:
            export(graph, example_images(cfg, EXPORT_BATCH), tmp)
        except Exception as exc:  # the exporter's errors are many and long: keep their first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{cfg.MODEL.META_ARCHITECTURE} ({cfg.MODEL.BACKBONE.NAME}) does not export to "
                              f"ONNX: {type(exc).__name__}: {first}") from None
        checked = check_agreement(cfg, graph, session(tmp), check_batch)
        os.replace(tmp, output)
    finally:
        remove_quietly(tmp)
    return checked


def check_agreement(cfg, graph, sess, batch):
    """(max abs difference, min cosine, feature width) of the graph's features against PyTorch's
    on ``batch`` noise images; ExportError when a cosine is below MIN_COSINE."""
    images = example_images(cfg, batch, seed=1)
    with torch.no_grad():
        reference = graph(images).numpy()
    features = run(sess, images)
    if features.shape != reference.shape:
        raise ExportError(f"onnxruntime gives features of shape {features.shape}, PyTorch {reference.shape}; "
                          f"nothing written")
    difference, cosine = agreement(reference, features)
    if not cosine.min() >= MIN_COSINE:      # also refuses NaN
        raise ExportError(f"onnxruntime disagrees with PyTorch: min cosine {cosine.min():.6f} < "
                          f"{MIN_COSINE} over {batch} images (max abs difference {difference:.3g}); "
                          f"nothing written")
    return difference, float(cosine.min()), reference.shape[1]


def describe(cfg, graph):
    """One line on what the graph holds of PromptSG's prompt."""
    model = graph.model
    if getattr(model, "text", None) is None or getattr(model.heads, "mim", None) is None:
        return "visual encoder only"
    if model.inference_prompt == "composed":
        return "composed prompt: inversion network and text encoder per image"
    return f"simplified prompt {cfg.MODEL.PROMPTSG.SIMPLE_PROMPT!r} folded in as a constant (no text encoder)"
