"""CPU inference speed of an exported graph in onnxruntime against the PyTorch model it was
exported from (tools/perf/benchmark_onnx.py): the two alternate over timed rounds of about a given
length, so that other load on the machine hits both alike; each figure is the median round's."""
import os
import statistics
import tempfile
import time

import torch

from ..utils.records import run_record
from . import onnx_export


def check_runs(runs, opts):
    """Each run's config, checked before any model is built (one line per bad input)."""
    configs = []
    for run in runs:
        config_file = os.path.join(run, "config.yaml")
        weights = os.path.join(run, "model_final.pth")
        cfg = onnx_export.export_config(config_file, opts, os.path.join(tempfile.gettempdir(), "model.onnx"),
                                        weights=weights)[0]
        configs.append((run, cfg))
    return configs


def environment(threads):
    """Date, commit, machine and versions of this measurement."""
    import onnxruntime

    record = run_record(None, "+changes")
    return {"date": f"{record['date']} {record['time']}", "commit": record["commit"], "cpu": record["machine"]["cpu"],
            "cpus": record["machine"]["cpus"], "threads": threads, "load_average": os.getloadavg()[0],
            "torch": record["machine"]["torch"], "onnxruntime": onnxruntime.__version__,
            "python": record["machine"]["python"]}


def timed(call, batch, seconds):
    """images/s of ``call`` repeated for about ``seconds`` (at least once)."""
    start = time.perf_counter()
    count = 0
    while True:
        call()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return batch * count / elapsed


def measure(graph, sess, images, rounds, seconds, progress):
    """Median images/s of PyTorch and of onnxruntime, alternating which goes first."""
    array = images.numpy()

    def pytorch():
        with torch.inference_mode():
            graph(images)

    def onnxruntime():
        onnx_export.run(sess, array)

    engines = {"pytorch": pytorch, "onnxruntime": onnxruntime}
    for call in engines.values():   # warm-up: first-call allocations, onnxruntime's arena
        call()
        call()
    speeds = {name: [] for name in engines}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            speeds[name].append(timed(engines[name], len(images), seconds))
            progress.update()
    return {name: statistics.median(values) for name, values in speeds.items()}


def model_name(cfg):
    """The model's row label: PromptSG and its test prompt, the CLIP baseline, or FastReID's."""
    if cfg.MODEL.META_ARCHITECTURE != "PromptSG":
        return f"{cfg.MODEL.META_ARCHITECTURE} {cfg.MODEL.BACKBONE.NAME}"
    p = cfg.MODEL.PROMPTSG
    if p.MIM.CROSS_LAYERS == 0:
        return f"CLIP baseline {cfg.MODEL.CLIP.NAME}"
    return f"PromptSG {cfg.MODEL.CLIP.NAME}, {p.INFERENCE_PROMPT} prompt"
