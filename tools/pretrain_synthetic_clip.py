#!/usr/bin/env python
"""Contrastive image-caption pretraining of a small CLIP on synthetic people.

PromptSG keeps CLIP's text tower frozen, so the tower must already tie words to image content.
Offline there are no pretrained weights for the CPU-sized CLIP of the synthetic demo, so this tool
makes them: it generates a pool of synthetic people, none of them a re-ID identity
(``promptsg.data.synthetic.generate_caption_pool``), each captioned from its attributes
("a person with short black hair wearing a short-sleeved red shirt, blue trousers and white
shoes."), and trains open_clip model ``--model`` from random weights on the image-caption pairs
with open_clip's ``ClipLoss``: AdamW, linear warm-up then cosine decay, random flip and
pad-and-crop, one image per distinct caption in a batch (no false negatives).

    python tools/pretrain_synthetic_clip.py     # -> $FASTREID_DATASETS/SyntheticCLIP/small-ViT.pt

The output is an open_clip checkpoint ``{"epoch", "state_dict"}`` for ``MODEL.CLIP.PRETRAINED``,
written atomically, with a sidecar ``<out>.json`` holding the parameters, the training time and
a zero-shot check: each image of the held-out pool identities (``--eval-ids``) picks its caption
among its own and ``--choices - 1`` captions of other held-out identities (chance 1/choices), and
among all held-out captions. A checkpoint whose sidecar has the same parameters is reused.
"""
import argparse
import os

from promptsg.data.clip_pretraining import (DEFAULTS, pretrain, read_sidecar, run_params, save_checkpoint,
                                            sidecar_path, write_json)


def parse_args(argv=None):
    root = os.path.join(os.getenv("FASTREID_DATASETS", "datasets"), "SyntheticCLIP")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULTS["model"], help="open_clip model name")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimisation steps")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="image-caption pairs per step")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
                        help="AdamW weight decay of the weight matrices")
    parser.add_argument("--num-ids", type=int, default=DEFAULTS["num_ids"], help="pool identities to train on")
    parser.add_argument("--images-per-id", type=int, default=DEFAULTS["images_per_id"])
    parser.add_argument("--eval-ids", type=int, default=DEFAULTS["eval_ids"],
                        help="further pool identities held out for the zero-shot check")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="pool and training seed")
    parser.add_argument("--size", type=int, nargs=2, default=DEFAULTS["size"], metavar=("H", "W"),
                        help="image height and width of the pool (the re-ID images' size by default)")
    parser.add_argument("--pool", default=os.path.join(root, "pool"), help="caption pool directory")
    parser.add_argument("--out", default=None, help="checkpoint (default: <root>/SyntheticCLIP/<model>.pt)")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(root, f"{args.model}.pt")
    if args.steps < 1 or args.batch < 2 or args.warmup < 0 or args.eval_ids < 2:
        parser.error("need --steps >= 1, --batch >= 2, --warmup >= 0 and --eval-ids >= 2")
    return args


def main(argv=None):
    """Train (or reuse) the checkpoint; returns the trained model (None if reused) and the summary."""
    args = parse_args(argv)
    sidecar = read_sidecar(args.out)
    if os.path.isfile(args.out) and sidecar is not None and sidecar.get("params") == run_params(args):
        print(f"reusing {args.out}: pretrained with the same parameters ({args.steps} steps, "
              f"{sidecar['total_seconds']:.0f} s)", flush=True)
        return None, sidecar
    if sidecar is not None:   # stale: never let it describe the checkpoint written next
        os.remove(sidecar_path(args.out))
    model, summary = pretrain(args)
    save_checkpoint(model, summary["epoch"], args.out)
    write_json(summary, sidecar_path(args.out))
    print(f"wrote {args.out} ({summary['total_seconds']:.0f} s)", flush=True)
    return model, summary


if __name__ == "__main__":
    main()
