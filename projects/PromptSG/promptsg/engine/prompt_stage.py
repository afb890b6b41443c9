"""CLIP-ReID's stage 1 inside FastReID's trainer (the model: ``modeling/clip_reid.py``).

``prepare_identity_prompts`` runs in ``Trainer.train`` before stage 2's first step (before
FastReID's training loop, so a stage-1 file that does not fit fails in one line): it gives the
model its identity prompts and their frozen text features T, in one of three ways, logged:

    the resumed checkpoint     a ``--resume`` from a stage-2 checkpoint: the prompts and T are in it
    a stage-1 file             MODEL.CLIPREID.STAGE1_WEIGHTS, or with ``--resume`` OUTPUT_DIR's own
    stage 1 run here           the training set's images (test transforms: resized, no augmentation)
                               through the frozen visual encoder once, then SOLVER.STAGE1's epochs
                               of the context tokens alone; written to OUTPUT_DIR/clip_reid_stage1.pth

With several processes, process 0 runs stage 1 and writes the file; the others wait and read it.
Stage 1 draws its batches from its own generator (seeded by SEED), so stage 2 starts from the same
RNG state whether stage 1 ran here or came from a file.
"""
import logging
import math
import os
import time

import torch
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from fastreid.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..modeling.clip_reid import stage1_learning_rate, stage1_loss
from ..utils.errors import InputError
from .checkpoint import save_atomically

logger = logging.getLogger(__name__)
STAGE1_FILE = "clip_reid_stage1.pth"


def prepare_identity_prompts(trainer):
    """Stage 1 before stage 2 (the module docstring), called by ``Trainer.train`` before FastReID's
    training loop starts; its time goes to ``trainer.timing``."""
    cfg, model = trainer.cfg, unwrap(trainer.model)
    if trainer.resumed:
        logger.info("CLIP-ReID stage 1: the identity prompts and their text features come with the resumed "
                    "checkpoint")
        return
    path = cfg.MODEL.CLIPREID.STAGE1_WEIGHTS
    own = os.path.join(cfg.OUTPUT_DIR, STAGE1_FILE)
    if not path and trainer.resuming and os.path.isfile(own):
        path = own
    start = time.perf_counter()
    if path:
        record = load_stage1(model, path)
        logger.info("CLIP-ReID stage 1: read from %s (%d epochs, final loss %.4f)", path, record["epochs"],
                    record["loss"][-1] if record["loss"] else float("nan"))
    else:
        if comm.is_main_process():
            record = train_stage1(cfg, model, trainer.data_loader.dataset.img_items)
            save_stage1(own, model, record)
        comm.synchronize()
        if not comm.is_main_process():
            load_stage1(model, own)
        trainer.timing["stage1_seconds"] = time.perf_counter() - start
    model.refresh_identity_text()


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def image_features(cfg, model, img_items):
    """v (N, E) of every training image through the frozen encoder, and its identity label (N,),
    labelled as FastReID's training set labels them (CommDataset relabels the sorted identities)."""
    dataset = CommDataset(img_items, build_transforms(cfg, is_train=False), relabel=True)
    # Its own generator: a loader drawn from the global RNG would move stage 2's random stream.
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.TEST.IMS_PER_BATCH,
                                         num_workers=cfg.DATALOADER.NUM_WORKERS,
                                         generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    feats, labels = [], []
    amp = cfg.SOLVER.AMP.ENABLED and model.device.type == "cuda"
    try:
        for batch in loader:
            with torch.autocast(model.device.type, enabled=amp):
                feats.append(model.image_features(batch))
            labels.append(batch["targets"].to(model.device))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def train_stage1(cfg, model, img_items):
    """Stage 1: the context tokens trained alone, for SOLVER.STAGE1.MAX_EPOCH epochs of shuffled
    batches of SOLVER.STAGE1.IMS_PER_BATCH images (the remainder a smaller last batch, as in
    CLIP-ReID's loop). Returns the record ``save_stage1`` writes: the loss of each epoch, its seconds."""
    s1 = cfg.SOLVER.STAGE1
    start = time.perf_counter()
    feats, labels = image_features(cfg, model, img_items)
    extract_seconds = time.perf_counter() - start
    logger.info("CLIP-ReID stage 1: %d training images through the frozen visual encoder in %.1f s",
                len(feats), extract_seconds)
    context = model.prompts.context
    context.requires_grad_(True)
    optimizer = torch.optim.Adam([context], lr=s1.BASE_LR, weight_decay=s1.WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(cfg.SEED if cfg.SEED >= 0 else torch.initial_seed())
    batch = min(s1.IMS_PER_BATCH, len(feats))
    amp = cfg.SOLVER.AMP.ENABLED and model.device.type == "cuda"
    losses = []
    try:
        for epoch in range(s1.MAX_EPOCH):
            lr = stage1_learning_rate(epoch + 1, s1.BASE_LR, s1.WARMUP_LR, s1.WARMUP_EPOCHS, s1.MIN_LR, s1.MAX_EPOCH)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = torch.randperm(len(feats), generator=generator).to(feats.device)
            total = feats.new_zeros(())
            steps = math.ceil(len(feats) / batch)
            for step in range(steps):
                rows = order[step * batch:(step + 1) * batch]
                with torch.autocast(model.device.type, enabled=amp):
                    text = model.identity_text_features(labels[rows])
                loss = stage1_loss(feats[rows], text, labels[rows], s1.TEMPERATURE)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
            losses.append(float(total) / steps)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"CLIP-ReID stage 1: the loss is {losses[-1]} in epoch {epoch + 1}; "
                                         f"lower SOLVER.STAGE1.BASE_LR ({s1.BASE_LR})")
            if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == s1.MAX_EPOCH:
                logger.info("CLIP-ReID stage 1: epoch %d/%d  loss %.4f  lr %.3g", epoch + 1, s1.MAX_EPOCH,
                            losses[-1], lr)
    finally:
        context.requires_grad_(False)
    return {"epochs": s1.MAX_EPOCH, "loss": losses, "seconds": time.perf_counter() - start,
            "extract_seconds": extract_seconds, "images": len(feats)}


def save_stage1(path, model, record):
    """The stage-1 file: the context tokens, the prompt and CLIP model they belong to, and the record."""
    context = model.prompts.context.detach().cpu()
    data = {"context": context, "prompt": model.prompts_text, "clip": model.clip_name, **record}

    def write(tmp):
        torch.save(data, tmp)

    save_atomically(path, write, context.numel() * context.element_size() + 65536, "CLIP-ReID's stage-1 file")
    logger.info("CLIP-ReID stage 1: written to %s", path)


def load_stage1(model, path):
    """Put a stage-1 file's context tokens into ``model``; one line naming the file if it does not fit."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # a missing, truncated or foreign file
        raise InputError(f"CLIP-ReID stage-1 file {path} does not load ({type(exc).__name__}: {exc})") from None
    context = data.get("context") if isinstance(data, dict) else None
    own = model.prompts.context
    if not isinstance(context, torch.Tensor):
        raise InputError(f"{path} is not a CLIP-ReID stage-1 file (no 'context' tensor)")
    if context.shape != own.shape:
        raise InputError(f"{path}: its context tokens are {tuple(context.shape)} (identities, tokens, width); this "
                         f"model's are {tuple(own.shape)} (another training set, prompt or CLIP model)")
    if not torch.isfinite(context).all():
        raise InputError(f"{path}: its context tokens are not all finite")
    with torch.no_grad():
        own.copy_(context.to(own.device, own.dtype))
    return data
