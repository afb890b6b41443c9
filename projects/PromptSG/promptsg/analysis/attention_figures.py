"""The attention maps drawn (tools/attention_maps.py): one column per image, the image with its
person outlined, then each map as a heatmap over it with its share inside the person; saved as a
256-colour PNG."""
import os

import numpy as np
from matplotlib import pyplot as plt
from PIL import Image

from .attention_maps import head_mean, mask_at_input, mask_share, pixel_density
from .attention_shares import LABELS


def figure_rows(results, per_head):
    """The rows under the image row: [(label, model kind, map name, head or None for the mean)]."""
    rows = [(LABELS[name], "baseline", name, None) for name in ("baseline", "baseline_last_block")
            if "baseline" in results]
    for name in ("simplified", "composed"):
        value = results["promptsg"].maps.get(name)
        if value is not None:
            heads = range(value.shape[1]) if per_head else [None]
            rows += [(LABELS[name] + (f", head {h}" if h is not None else ""), "promptsg", name, h) for h in heads]
    return rows


def to_image(tensor):
    """A (3, H, W) uint8 input image as an (H, W, 3) array."""
    return tensor.permute(1, 2, 0).numpy()


def draw_map(ax, res, i, value):
    """``value`` (gh, gw) as a heatmap over the image (scaled to its maximum), with its share inside
    the person when known."""
    image = to_image(res.images[i])
    density = pixel_density(value, res.grid).numpy()
    ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.imshow(density / max(float(density.max()), 1e-12), cmap="jet", alpha=0.5, vmin=0, vmax=1,
              interpolation="nearest")
    if res.coverages[i] is not None:
        share = float(mask_share(value, res.coverages[i]))
        ax.text(1, image.shape[0] - 2, f"in person {share:.0%}", color="white", fontsize=5,
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})


def draw_figure(path, indices, items, results, masks, per_head, dpi):
    """One column per image: the image (its person outlined), then one heatmap per row."""
    rows = figure_rows(results, per_head)
    fig, axes = plt.subplots(1 + len(rows), len(indices), squeeze=False,
                             figsize=(0.95 * len(indices) + 0.5, 1.75 * (1 + len(rows))))
    base = results["promptsg"]
    for c, i in enumerate(indices):
        ax = axes[0, c]
        ax.imshow(to_image(base.images[i]), interpolation="nearest")
        title = os.path.basename(items[i][0])
        if base.coverages[i] is not None:
            ax.contour(mask_at_input(masks[i], base.cfg).numpy(), levels=[0.5], colors="white", linewidths=0.6)
            title += f"\nperson: {base.coverages[i].mean():.0%}"
        ax.set_title(title, fontsize=5)
        for r, (_, kind, name, head) in enumerate(rows, 1):
            value = results[kind].maps[name][i]
            draw_map(axes[r, c], results[kind], i, head_mean(value) if head is None else value[head])
    for r, label in enumerate(["image"] + [row[0] for row in rows]):
        axes[r, 0].set_ylabel(label.replace(" (", "\n(").replace(' "', '\n"'), fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout(pad=0.2, h_pad=0.3, w_pad=0.2)
    save_png(fig, path, dpi)


def save_png(fig, path, dpi):
    """The figure as a 256-colour PNG, about a third of the size of an RGB one; the heatmaps lie over
    greyscale images, so 256 colours show them without visible banding."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, kmeans=4).save(path, optimize=True)
