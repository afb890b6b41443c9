#!/usr/bin/env python
"""How long train_net.py's start-up image check takes at MSMT17's size (126,441 images).

Writes N person-crop-sized JPEGs (random heights 128-384, widths 48-160, as MSMT17's crops vary;
blurred noise, about MSMT17's 20 kB per image) and times ``promptsg.engine.preflight.verify_images_cached``
on them: the first start (every image decoded, JPEGs at 1/8 scale, on a thread pool), a second
start (every image known by size and modification time), and one image changed.

    python tools/perf/benchmark_image_check.py --num 126441 --dir /tmp/imagecheck
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

import promptsg  # noqa: F401
from promptsg.engine.preflight import verify_images_cached


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=126441)
    parser.add_argument("--dir", default=None, help="where to write the images (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the images afterwards")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="imagecheck-")
    images, cache = os.path.join(root, "images"), os.path.join(root, "cache")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(0)
    tiles = [np.asarray(Image.fromarray(rng.integers(0, 256, (384, 160, 3), dtype=np.uint8))
                        .filter(ImageFilter.GaussianBlur(1.5))) for _ in range(16)]
    start = time.perf_counter()
    paths = []
    for i in range(args.num):
        path = os.path.join(images, f"{i:06d}.jpg")
        if not os.path.exists(path):
            h, w = int(rng.integers(128, 385)), int(rng.integers(48, 161))
            Image.fromarray(tiles[i % 16][:h, :w]).save(path, quality=90)
        paths.append(path)
    written = time.perf_counter() - start
    size = sum(os.path.getsize(p) for p in paths)

    timings = {}
    for label in ("first start", "second start"):
        start = time.perf_counter()
        verify_images_cached(paths, cache)
        timings[label] = time.perf_counter() - start
    os.utime(paths[0], ns=(1, 1))
    start = time.perf_counter()
    verify_images_cached(paths, cache)
    timings["one image changed"] = time.perf_counter() - start

    print(f"{args.num} JPEGs, {size / 1e6:.0f} MB (written in {written:.0f} s), {os.cpu_count()} CPUs")
    for label, seconds in timings.items():
        print(f"  {label:18s} {seconds:7.2f} s  ({seconds / args.num * 1e6:.1f} us per image)")
    if not args.keep and not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
