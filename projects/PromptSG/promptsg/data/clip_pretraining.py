"""A small CLIP pretrained contrastively on the caption pool's synthetic people, the frozen text
tower the synthetic demo starts from (tools/pretrain_synthetic_clip.py).

open_clip model ``model`` from random weights, trained on image-caption pairs with open_clip's
``ClipLoss``: AdamW, linear warm-up then cosine decay, random flip and pad-and-crop, one image per
distinct caption in a batch (no false negatives). ``zero_shot`` checks it on held-out people.
"""
import json
import logging
import math
import os
import time

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

from ..modeling.clip_weights import create_clip_model
from .synthetic import CAPTION_VERSION, GENERATOR_VERSION, generate_caption_pool, read_caption_pool

# Defaults: about 100 s on two idle CPU cores for small-ViT, pool generation included. Within that
# budget, batch 32 at lr 1e-3 aligned best (zero-shot top-1 among 10: 73%; batch 64 at lr 1e-3:
# 70%, at 2e-3: 48%; batch 16: 53%), and 2 images of 3000 identities beat 1 of 6000 or 3 of 2000.
DEFAULTS = dict(model="small-ViT", steps=340, batch=32, lr=1e-3, warmup=30, weight_decay=0.1,
                num_ids=3000, images_per_id=2, eval_ids=200, seed=0, size=(128, 64))
PAD = 4               # pad-and-crop augmentation, pixels
CHOICES = 10          # captions an image chooses from in the zero-shot check


def sidecar_path(checkpoint):
    """The JSON file beside ``checkpoint`` that describes it: ``<checkpoint less .pt>.json``."""
    return os.path.splitext(checkpoint)[0] + ".json"


def run_params(args):
    """Everything the checkpoint depends on (``args``: the keys of DEFAULTS); an equal sidecar means
    the checkpoint is reused."""
    keys = ("model", "steps", "batch", "lr", "warmup", "weight_decay", "num_ids", "images_per_id",
            "eval_ids", "seed")
    return {**{k: getattr(args, k) for k in keys}, "size": list(args.size), "pad": PAD,
            "generator_version": GENERATOR_VERSION, "caption_version": CAPTION_VERSION}


def load_pool(pool_dir, num_train_ids):
    """Pool images as one uint8 tensor (N, 3, H, W), their captions, and which are held out."""
    items = read_caption_pool(pool_dir)
    images = torch.from_numpy(np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in items]))
    held_out = torch.tensor([int(os.path.basename(path).split("_")[0]) > num_train_ids for path, _ in items])
    return images.permute(0, 3, 1, 2).contiguous(), [caption for _, caption in items], held_out


def caption_batches(caption_ids, batch, rng):
    """Endless batches of image indices, one image per distinct caption in each batch.

    Captions are visited in a fresh random order every pass; each batch takes a random image of
    ``batch`` consecutive captions. Images sharing a caption are never each other's negatives.
    """
    groups = {}
    for i, c in enumerate(caption_ids):
        groups.setdefault(c, []).append(i)
    groups = list(groups.values())
    if batch > len(groups):
        raise ValueError(f"--batch {batch} is larger than the {len(groups)} distinct training captions")
    while True:
        order = rng.permutation(len(groups))
        for start in range(0, len(order) - batch + 1, batch):
            yield [groups[g][rng.integers(len(groups[g]))] for g in order[start:start + batch]]


def build_optimizer(model, lr, weight_decay):
    """AdamW with CLIP's betas; no weight decay on gains, biases, the class token and logit scale."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def build_scheduler(optimizer, warmup, steps):
    """Linear warm-up from 1% over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps - warmup, 1))
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def normalize(images):
    """uint8 (B, 3, H, W) -> float, normalised with CLIP's image mean and std."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def zero_shot(model, tokenizer, images, captions, choices=CHOICES, seed=0, chunk=256):
    """Caption retrieval by images of unseen identities, with open_clip's encoders.

    ``top1``: each image picks among its own caption and ``choices - 1`` random captions of other
    identities (chance 1/choices); ``all_top1``: among every distinct caption given (chance
    1/#captions).
    """
    model.eval()
    unique = sorted(set(captions))
    if len(unique) < choices:
        raise ValueError(f"the zero-shot check needs >= {choices} distinct captions, got {len(unique)}")
    own = torch.tensor([unique.index(c) for c in captions])
    image_f = torch.cat([model.encode_image(normalize(images[i:i + chunk]), normalize=True)
                         for i in range(0, len(images), chunk)])
    text_f = model.encode_text(tokenizer(unique), normalize=True)
    sim = image_f @ text_f.T                                                # (N, U)
    rng = np.random.default_rng(seed)
    wins = 0
    for i, c in enumerate(own.tolist()):
        others = rng.choice(np.delete(np.arange(len(unique)), c), choices - 1, replace=False)
        wins += bool(sim[i, c] > sim[i, torch.from_numpy(others)].max())
    return {"choices": choices, "top1": wins / len(own), "chance": 1.0 / choices,
            "all_top1": float((sim.argmax(1) == own).float().mean()), "all_chance": 1.0 / len(unique),
            "images": len(own), "captions": len(unique)}


def save_checkpoint(model, epoch, path):
    """open_clip's training checkpoint format, written to a temporary file and renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"epoch": epoch, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    """``obj`` as indented JSON, written to a temporary file and renamed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_sidecar(checkpoint):
    """The sidecar of ``checkpoint``, or None when it is missing or unreadable."""
    try:
        with open(sidecar_path(checkpoint)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pretrain(args):
    """Generate the pool and train; returns (trained model, summary written to the sidecar).
    ``args``: tools/pretrain_synthetic_clip.py's arguments (the keys of DEFAULTS, ``pool``,
    ``log_every``)."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pool = generate_caption_pool(args.pool, seed=args.seed, num_ids=args.num_ids + args.eval_ids,
                                 images_per_id=args.images_per_id, height=args.size[0], width=args.size[1])
    images, captions, held_out = load_pool(args.pool, args.num_ids)
    height, width = images.shape[-2:]
    train_idx = torch.nonzero(~held_out).flatten()
    unique = sorted(set(captions[i] for i in train_idx.tolist()))
    caption_id = {c: k for k, c in enumerate(unique)}
    tokenizer = open_clip.get_tokenizer(args.model)
    tokens = tokenizer(unique)                                              # (U, context)
    train_caption_ids = [caption_id[captions[i]] for i in train_idx.tolist()]
    data_seconds = time.perf_counter() - start
    print(f"caption pool {args.pool}: {pool['counts']['images']} images of {pool['counts']['identities']} "
          f"identities ({args.eval_ids} held out), {len(unique)} distinct training captions, "
          f"{data_seconds:.1f} s", flush=True)

    # Random initial weights are the point here: silence create_clip_model's warning about them.
    logging.getLogger("promptsg.modeling.clip_weights").setLevel(logging.ERROR)
    model = create_clip_model(args.model, "", (height, width))
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.warmup, args.steps)
    loss_fn = open_clip.ClipLoss()
    augment = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop((height, width), padding=PAD)])
    batches = caption_batches(train_caption_ids, args.batch, rng)

    model.train()
    losses = []
    train_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = next(batches)
        batch = normalize(torch.stack([augment(images[train_idx[i]]) for i in idx]))
        text = tokens[[train_caption_ids[i] for i in idx]]
        image_f, text_f, logit_scale = model(batch, text)
        loss = loss_fn(image_f, text_f, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))   # as CLIP
        losses.append(loss.item())
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {loss.item():.3f}  logit scale {logit_scale.item():.1f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - train_start:.0f} s", flush=True)
    train_seconds = time.perf_counter() - train_start

    check = zero_shot(model, tokenizer, images[held_out], [c for c, h in zip(captions, held_out) if h],
                      seed=args.seed)
    print(f"zero-shot on {check['images']} images of {args.eval_ids} held-out identities: caption top-1 "
          f"{100 * check['top1']:.1f}% among {check['choices']} (chance {100 * check['chance']:.1f}%), "
          f"{100 * check['all_top1']:.1f}% among all {check['captions']} "
          f"(chance {100 * check['all_chance']:.1f}%)", flush=True)
    epochs = math.ceil(args.steps * args.batch / len(unique))
    summary = {"params": run_params(args), "epoch": epochs, "losses": losses, "zero_shot": check,
               "data_seconds": data_seconds, "train_seconds": train_seconds,
               "total_seconds": time.perf_counter() - start, "torch_threads": torch.get_num_threads()}
    return model, summary
