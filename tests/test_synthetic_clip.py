"""Captions of synthetic people, the caption pool, the zero-shot check of
promptsg.data.clip_pretraining, and tools/pretrain_synthetic_clip.py (a tiny CLIP, a tiny pool, a
few steps: seconds on CPU)."""
import json
import math
import os
from pathlib import Path

import open_clip
import pytest
import torch

import promptsg  # noqa: F401  (registers the tiny CLIP configs with open_clip)
from promptsg.modeling.clip_weights import create_clip_model
from promptsg.data import synthetic
from promptsg.data.clip_pretraining import zero_shot
from promptsg.data.synthetic import describe_person, generate_caption_pool, generate_synthetic_market

from tiny_runs import load_tool

REPO = Path(__file__).resolve().parents[1]
pretrain_tool = load_tool("tools/pretrain_synthetic_clip.py")


def _person(**attributes):
    """A person dict as _sample_person makes it, with exact palette colours."""
    person = {
        "shirt": (200, 30, 35), "shirt2": (235, 235, 230), "pattern": "vstripes", "stripe_period": 0.05,
        "long_sleeves": False, "lower": (70, 100, 150), "lower_type": "trousers", "shoes": (240, 240, 240),
        "hair": (20, 15, 12), "hair_style": "short", "cap": (200, 30, 35), "skin": (235, 190, 155),
        "bag": "backpack", "bag_colour": (25, 25, 25), "bag_side": 1, "height": 0.9, "width": 1.0,
    }
    person.update(attributes)
    return person


# ---- captions ----

def test_caption_names_hair_shirt_pattern_sleeves_lower_clothing_shoes_and_bag():
    assert describe_person(_person()) == (
        "a person with short black hair wearing a short-sleeved red shirt with white vertical stripes, "
        "blue trousers and white shoes, carrying a black backpack.")


def test_caption_of_a_cap_a_two_tone_shirt_a_skirt_and_a_handbag():
    person = _person(hair_style="cap", cap=(240, 130, 30), pattern="twotone", shirt=(20, 30, 80),
                     shirt2=(230, 200, 40), long_sleeves=True, lower=(110, 110, 115), lower_type="skirt",
                     shoes=(110, 70, 40), bag="handbag", bag_colour=(140, 40, 40))
    assert describe_person(person) == (
        "a person in an orange cap wearing a long-sleeved navy and yellow two-tone shirt, a grey skirt "
        "and brown shoes, carrying a red handbag.")


def test_caption_names_colours_after_the_nearest_palette_entry_and_omits_a_missing_bag():
    # Jittered colours as identities get them; a plain shirt names no second colour.
    person = _person(shirt=(190, 41, 30), pattern="solid", lower=(30, 20, 33), lower_type="shorts",
                     shoes=(115, 118, 130), hair=(205, 185, 100), hair_style="long", bag="none")
    assert describe_person(person) == (
        "a person with long blond hair wearing a short-sleeved red shirt, black shorts and grey shoes.")


def test_every_palette_entry_has_a_colour_name():
    for palette, names in ((synthetic.SHIRT_COLOURS, synthetic.SHIRT_COLOUR_NAMES),
                           (synthetic.LOWER_COLOURS, synthetic.LOWER_COLOUR_NAMES),
                           (synthetic.SHOE_COLOURS, synthetic.SHOE_COLOUR_NAMES),
                           (synthetic.HAIR_COLOURS, synthetic.HAIR_COLOUR_NAMES),
                           (synthetic.BAG_COLOURS, synthetic.BAG_COLOUR_NAMES)):
        assert len(names) == len(palette) and len(set(names)) == len(names)


# ---- the caption pool ----

def test_pool_identities_are_none_of_the_reid_identities(tmp_path, monkeypatch):
    pool_people = []

    def recording_describe(person):
        pool_people.append(person)
        return describe_person(person)

    monkeypatch.setattr(synthetic.captions, "describe_person", recording_describe)
    generate_caption_pool(tmp_path / "pool", seed=0, num_ids=300, images_per_id=1, height=32, width=16)
    assert len(pool_people) == 300
    reid = synthetic._sample_identities({"seed": 0, "num_train_ids": synthetic.DEFAULT_NUM_TRAIN_IDS,
                                         "num_test_ids": synthetic.DEFAULT_NUM_TEST_IDS})
    assert len(reid) == synthetic.DEFAULT_NUM_TRAIN_IDS + synthetic.DEFAULT_NUM_TEST_IDS
    reid_people = {tuple(sorted(p.items())) for p in reid.values()}
    assert not reid_people & {tuple(sorted(p.items())) for p in pool_people}


def test_pool_layout_captions_and_reuse(tmp_path):
    d = tmp_path / "pool"
    manifest = generate_caption_pool(d, seed=1, num_ids=6, images_per_id=2, height=32, width=16)
    with open(d / "captions.json") as f:
        captions = json.load(f)
    assert sorted(captions) == sorted(os.listdir(d / "images")) and len(captions) == 12
    assert manifest["counts"] == {"identities": 6, "images": 12}
    # Both images of an identity share its caption.
    for name, caption in captions.items():
        assert captions[name[:6] + "000.jpg"] == caption and caption.startswith("a person ")
    stamps = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    assert generate_caption_pool(d, seed=1, num_ids=6, images_per_id=2, height=32, width=16) == manifest
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == stamps
    assert [c for _, c in synthetic.read_caption_pool(d)] == [captions[n] for n in sorted(captions)]


def test_a_reid_dataset_directory_is_never_taken_for_a_pool(tmp_path):
    generate_synthetic_market(tmp_path / "market", num_train_ids=2, num_test_ids=2, num_distractors=0,
                              num_junk=0, height=32, width=16)
    with pytest.raises(RuntimeError, match="not created by generate_caption_pool"):
        generate_caption_pool(tmp_path / "market", num_ids=2, images_per_id=1)


# ---- the zero-shot check ----

class _OneHotCLIP(torch.nn.Module):
    """Image i (all pixels i before CLIP's normalisation) embeds as caption ``match[i]``'s one-hot
    vector; caption k as one-hot k."""

    def __init__(self, match, num_captions):
        super().__init__()
        self.match, self.num_captions = match, num_captions

    def encode_image(self, images, normalize=False):
        pixel = images[:, 0, 0, 0] * open_clip.OPENAI_DATASET_STD[0] + open_clip.OPENAI_DATASET_MEAN[0]
        return torch.nn.functional.one_hot(self.match[torch.round(pixel * 255).long()], self.num_captions).float()

    def encode_text(self, tokens, normalize=False):
        return torch.eye(self.num_captions)


def test_zero_shot_check_counts_an_image_right_when_its_own_caption_scores_highest():
    captions = [f"caption {k:02d}" for k in range(12)]      # image i's caption is number i
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2).contiguous()
    # 8 images embed at their own caption, 4 at another one.
    match = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 8, 11, 10])
    result = zero_shot(_OneHotCLIP(match, 12), lambda texts: None, images, captions, choices=12)
    assert result["top1"] == pytest.approx(8 / 12) and result["all_top1"] == pytest.approx(8 / 12)
    assert result["chance"] == pytest.approx(1 / 12) and result["all_chance"] == pytest.approx(1 / 12)
    assert result["images"] == 12 and result["captions"] == 12


# ---- tools/pretrain_synthetic_clip.py ----

TINY = ["--model", "tiny-ViT", "--num-ids", "20", "--images-per-id", "4", "--eval-ids", "12", "--steps", "60",
        "--batch", "16", "--warmup", "3", "--lr", "1e-3", "--log-every", "20"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("SyntheticCLIP")
    args = [*TINY, "--pool", str(root / "pool"), "--out", str(root / "tiny-ViT.pt")]
    model, summary = pretrain_tool.main(args)
    return root, args, model, summary


def test_checkpoint_loads_through_create_clip_model_with_identical_outputs(pretrained):
    root, _, model, summary = pretrained
    path = root / "tiny-ViT.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"epoch", "state_dict"} and checkpoint["epoch"] == summary["epoch"]
    loaded = create_clip_model("tiny-ViT", pretrained=str(path), image_size=(128, 64), activation="gelu").eval()
    model.eval()
    images = torch.randn(3, 3, 128, 64, generator=torch.Generator().manual_seed(0))
    text = open_clip.get_tokenizer("tiny-ViT")([describe_person(_person()), "a person in a red cap."])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))


def test_contrastive_loss_falls_and_the_sidecar_records_the_run(pretrained):
    root, _, _, summary = pretrained
    losses = summary["losses"]
    assert len(losses) == 60
    # Below the loss of embeddings that tell nothing apart, log(batch), and well below the start.
    last, first = sum(losses[-5:]) / 5, sum(losses[:5]) / 5
    assert last < math.log(16) - 0.3 and last < first - 0.5
    with open(root / "tiny-ViT.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["params"]["steps"] == 60 and summary["zero_shot"]["images"] == 48
    assert not [p for p in os.listdir(root) if ".tmp" in p]


def test_same_parameters_reuse_the_checkpoint_without_training(pretrained, capsys):
    root, args, _, summary = pretrained
    stamp = (root / "tiny-ViT.pt").stat().st_mtime_ns
    model, reused = pretrain_tool.main(args)
    assert model is None and reused == json.loads(json.dumps(summary))
    assert "reusing" in capsys.readouterr().out
    assert (root / "tiny-ViT.pt").stat().st_mtime_ns == stamp
