"""Inference speed of models side by side: each model's images/s and its speed relative to the
first, the models taking turns batch by batch so that a change in the machine's load falls on all."""
import statistics
import sys
import time

import torch
from tqdm import tqdm


def make_inputs(cfg, batch_size):
    """A batch as FastReID's test loader gives it: 0-255 float images at INPUT.SIZE_TEST, camera 0."""
    height, width = cfg.INPUT.SIZE_TEST
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, height, width, generator=generator) * 255
    return {"images": images, "camids": torch.zeros(batch_size, dtype=torch.long)}


def fresh(inputs):
    """A copy of the batch: FastReID's Baseline normalises its input in place."""
    return {k: v.clone() for k, v in inputs.items()}


def measure_speed(models, inputs, warmup, rounds):
    """Each model's images/s (median over ``rounds`` timed batches, after ``warmup`` untimed ones)
    and its speed relative to the first model (the median over the rounds of the two batch times'
    ratio in the same round). The models take turns batch by batch, the starting one rotating,
    so a change in the machine's load falls on all of them and the paired ratios cancel it."""
    seconds = [[] for _ in models]
    with torch.no_grad():
        for step in tqdm(range(warmup + rounds), desc="timing (batches per model)", file=sys.stderr):
            for turn in range(len(models)):
                i = (step + turn) % len(models)
                batch = fresh(inputs[i])
                start = time.perf_counter()
                models[i](batch)
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    seconds[i].append(elapsed)
    per_second = [len(inputs[i]["images"]) / statistics.median(s) for i, s in enumerate(seconds)]
    relative = [statistics.median((seconds[0][k] / len(inputs[0]["images"])) / (t / len(inputs[i]["images"]))
                                  for k, t in enumerate(s)) for i, s in enumerate(seconds)]
    return per_second, relative
