"""Text-aware search (tools/extract_features.py --text) on the tiny synthetic split with a tiny CLIP
of random weights: words only, image and words, their invariants and bad input; and the caption
helper the benchmark (tools/evaluate_text_search.py) reads its text queries from."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import promptsg  # noqa: F401  (patches FastReID, registers PromptSG)
from fastreid.config import get_cfg
from fastreid.data.data_utils import read_image
from fastreid.data.transforms import build_transforms
from fastreid.engine import DefaultTrainer
from promptsg import add_promptsg_config
from promptsg.engine.checkpoint import load_for_inference
from promptsg.data import synthetic
from promptsg.engine.preflight import InputError

from tiny_runs import BASELINE_CFG, BOT_CFG, PROMPTSG_CFG, ROOT, TINY, load_extract_tool, market_ids, one_line_error

WORDS = "carrying a red backpack"


def tiny_cfg(config_file, *opts):
    cfg = add_promptsg_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list([*TINY, *opts])
    return cfg


def save_random_model(cfg, path):
    """A checkpoint of ``cfg``'s model with its random initial weights, as training writes it."""
    torch.manual_seed(0)
    model = DefaultTrainer.build_model(cfg)
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Checkpoints of a tiny PromptSG (composed prompt at test) and a tiny CLIP baseline."""
    out = tmp_path_factory.mktemp("weights")
    return {"promptsg": save_random_model(tiny_cfg(PROMPTSG_CFG), out / "promptsg.pth"),
            "baseline": save_random_model(tiny_cfg(BASELINE_CFG), out / "baseline.pth")}


def split_dirs(datasets_root):
    split = datasets_root / "SyntheticMarketTiny"
    return split / "query", split / "bounding_box_test"


# ---- the caption helper ----

def test_caption_helper_gives_the_caption_of_the_person_who_drew_each_image(datasets_root):
    """Each test image is drawn again, pixel for pixel, from the person the generator samples for
    its pid (so that person drew it), and identity_captions gives describe_person of that person."""
    split = datasets_root / "SyntheticMarketTiny"
    params = json.loads((split / "manifest.json").read_text())["params"]
    people = synthetic._sample_identities(params)
    captions = synthetic.identity_captions(split)
    images = sorted((split / "query").glob("*.jpg"))[:2] + sorted((split / "bounding_box_test").glob("0*.jpg"))[-2:]
    for path in images:
        pid, cam = market_ids(path)
        frame = int(path.name.split("_")[2])
        assert pid > params["num_train_ids"]                    # a test identity

        def drawn_by(person):
            image = synthetic._render(synthetic._sample_camera(params["seed"], cam),
                                      synthetic._rng(params["seed"], synthetic._TAG_IMAGE, pid, frame),
                                      params["height"], params["width"], person)
            synthetic._save_jpeg(image, str(datasets_root / "redrawn.jpg"))
            return np.array_equal(np.asarray(Image.open(datasets_root / "redrawn.jpg")), np.asarray(Image.open(path)))

        other = people[pid + 1 if pid + 1 in people else pid - 1]
        assert drawn_by(people[pid]) and not drawn_by(other), path
        assert captions[pid] == synthetic.describe_person(people[pid])
        assert synthetic.person_words(captions[pid]) == captions[pid][len("a person "):-1]
    assert len(captions) == params["num_train_ids"] + params["num_test_ids"]


# ---- words only ----

def test_words_only_search_ranks_images_by_cosine_of_text_and_image_embeddings(weights, datasets_root, tmp_path):
    """The ranking is 1 - cosine between open_clip's encode_text of "A photo of a person <words>."
    (the checkpoint's text tower loaded into a fresh open_clip model) and open_clip's forward of the
    checkpoint's visual tower on the images as FastReID's test transforms give them."""
    _, gallery_dir = split_dirs(datasets_root)
    texts, images, dist = load_extract_tool().main([
        "--config-file", PROMPTSG_CFG, "--images", str(gallery_dir), "--text", WORDS, "--output", str(tmp_path),
        "--top-k", "7", *TINY, "MODEL.WEIGHTS", weights["promptsg"]])

    cfg = tiny_cfg(PROMPTSG_CFG)
    state = torch.load(weights["promptsg"], weights_only=True)["model"]
    clip = open_clip.create_model("tiny-ViT")
    text_state = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    missing, unexpected = clip.load_state_dict(text_state, strict=False)
    assert not unexpected and all(k.startswith("visual.") or k == "logit_scale" for k in missing)
    with torch.no_grad():
        text = clip.encode_text(open_clip.get_tokenizer("tiny-ViT")(["A photo of a person carrying a red backpack."]))

    model = DefaultTrainer.build_model(cfg)
    load_for_inference(model, weights["promptsg"])
    paths = (tmp_path / "images.txt").read_text().split()
    assert paths == sorted(str(p) for p in gallery_dir.glob("*.jpg"))
    transform = build_transforms(cfg, is_train=False)
    pixels = torch.stack([transform(read_image(p)) for p in paths])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD))
    with torch.no_grad():
        v = model.backbone.visual((pixels - mean) / std)          # open_clip's VisionTransformer.forward

    np.testing.assert_allclose(np.load(tmp_path / "text_embeddings.npy"), text.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "image_embeddings.npy"), v.numpy(), atol=1e-4)
    cosine = (text @ v.T / text.norm() / v.norm(dim=1)).numpy()[0]
    expected = np.argsort(1 - cosine, kind="stable")[:7]
    (entry,) = json.loads((tmp_path / "ranking.json").read_text())
    assert entry["query"] == WORDS and entry["prompt"] == "A photo of a person carrying a red backpack."
    assert [g["image"] for g in entry["top"]] == [paths[g] for g in expected]
    np.testing.assert_allclose([g["distance"] for g in entry["top"]], 1 - cosine[expected], atol=1e-5)
    assert dist.shape == (1, len(paths)) and texts.shape == (1, 64) and images.shape == (len(paths), 64)
    assert (tmp_path / "texts.txt").read_text() == "A photo of a person carrying a red backpack.\n"


def test_words_only_search_with_the_clip_baseline_uses_its_clip_files_text_tower(weights, datasets_root, tmp_path):
    """The CLIP baseline's checkpoint holds no text tower: the frozen one of MODEL.CLIP.PRETRAINED
    embeds the words; its image embeddings v are its retrieval features. One query per
    --text-file entry."""
    clip = open_clip.create_model("tiny-ViT")
    clip_file = tmp_path / "tiny-clip.pt"
    torch.save({"state_dict": clip.state_dict()}, clip_file)
    baseline_cfg = tiny_cfg(BASELINE_CFG)
    baseline_cfg.MODEL.CLIP.PRETRAINED = str(clip_file)
    baseline_cfg.MODEL.CLIP.ACTIVATION = "gelu"
    baseline = save_random_model(baseline_cfg, tmp_path / "baseline.pth")
    queries = {"bag": WORDS, "cap": "in a red cap."}
    (tmp_path / "words.json").write_text(json.dumps(queries))
    _, gallery_dir = split_dirs(datasets_root)
    opts = [*TINY, "MODEL.CLIP.PRETRAINED", str(clip_file), "MODEL.CLIP.ACTIVATION", "gelu", "MODEL.WEIGHTS", baseline]
    tool = load_extract_tool()
    texts, images, _ = tool.main(["--config-file", BASELINE_CFG, "--images", str(gallery_dir), "--text-file",
                                  str(tmp_path / "words.json"), "--output", str(tmp_path / "text"), *opts])
    _, features, _ = tool.main(["--config-file", BASELINE_CFG, "--images", str(gallery_dir),
                                "--output", str(tmp_path / "plain"), *opts])
    with torch.no_grad():
        expected = clip.encode_text(open_clip.get_tokenizer("tiny-ViT")(
            ["A photo of a person carrying a red backpack.", "A photo of a person in a red cap."]))
    np.testing.assert_allclose(texts, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(images, features, atol=1e-6)
    assert [e["query"] for e in json.loads((tmp_path / "text" / "ranking.json").read_text())] == ["bag", "cap"]


# ---- image and words ----

@pytest.mark.parametrize("query", ["pooled", "tokens"])
def test_image_with_empty_words_gives_the_composed_prompt_feature(datasets_root, query):
    """features_with_words: empty words are the composed prompt exactly; words change the feature;
    images with different words in one batch get what each gets alone."""
    cfg = tiny_cfg(PROMPTSG_CFG, "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed", "MODEL.PROMPTSG.MIM.QUERY", query)
    torch.manual_seed(0)
    model = DefaultTrainer.build_model(cfg).eval()
    query_dir, _ = split_dirs(datasets_root)
    transform = build_transforms(cfg, is_train=False)
    paths = sorted(query_dir.glob("*.jpg"))[:5]
    batch = {"images": torch.stack([transform(read_image(str(p))) for p in paths]), "camids": torch.zeros(5).long()}
    with torch.no_grad():
        composed = model(batch)
        empty = model.features_with_words(batch, [""] * 5)
        worded = model.features_with_words(batch, [WORDS] * 5)
        mixed = model.features_with_words(batch, [WORDS, "", "in a red cap", WORDS, ""])
    torch.testing.assert_close(empty, composed, rtol=0, atol=0)
    # The words reach the feature through the MIM's attention weights (all the default fusion lets
    # through): a change of about 0.1% here, far above float32 rounding (1e-7).
    assert (worded - composed).norm(dim=1).min() > 1e-5 * composed.norm(dim=1).max()
    alone = {"": composed, WORDS: worded}
    for i, words in enumerate([WORDS, "", None, WORDS, ""]):
        if words is not None:
            torch.testing.assert_close(mixed[i], alone[words][i], rtol=1e-5, atol=1e-6)


def test_image_and_words_search_gives_each_query_its_words_and_the_gallery_its_usual_features(
        weights, datasets_root, tmp_path):
    """--query with --text-file: every query image is ranked with its own words (its feature is the
    one --text with those words gives), the gallery keeps the features of a search without words,
    and the ranking is the cosine ranking of the saved features."""
    query_dir, gallery_dir = split_dirs(datasets_root)
    queries = sorted(str(p) for p in query_dir.glob("*.jpg"))
    words = {os.path.basename(p): (WORDS if i % 2 else "in a red cap") for i, p in enumerate(queries)}
    (tmp_path / "words.json").write_text(json.dumps(words))
    common = ["--config-file", PROMPTSG_CFG, "--query", str(query_dir), "--images", str(gallery_dir), "--top-k", "4"]
    opts = [*TINY, "MODEL.PROMPTSG.INFERENCE_PROMPT", "composed", "MODEL.WEIGHTS", weights["promptsg"]]
    tool = load_extract_tool()
    runs = {name: tool.main([*common, *flags, "--output", str(tmp_path / name), *opts]) for name, flags in (
        ("image", []), ("file", ["--text-file", str(tmp_path / "words.json")]), ("bag", ["--text", WORDS]),
        ("cap", ["--text", "in a red cap"]))}
    np.testing.assert_array_equal(runs["file"][1], runs["image"][1])          # the gallery: no words
    for i in range(len(queries)):
        np.testing.assert_allclose(runs["file"][0][i], runs["bag" if i % 2 else "cap"][0][i], rtol=1e-5, atol=1e-5)
    assert np.abs(runs["bag"][0] - runs["image"][0]).max() > 1e-4            # the words change the query

    lists = json.loads((tmp_path / "file" / "ranking.json").read_text())
    assert [e["query"] for e in lists] == queries
    assert lists[1]["prompt"] == "A photo of a s* person carrying a red backpack."
    assert lists[0]["prompt"] == "A photo of a s* person in a red cap."
    query, gallery, _ = runs["file"]
    normed = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = 1 - normed(query) @ normed(gallery).T
    gallery_paths = (tmp_path / "file" / "images.txt").read_text().split()
    for q, entry in enumerate(lists):
        expected = np.argsort(cosine[q], kind="stable")[:4]
        assert [g["image"] for g in entry["top"]] == [gallery_paths[g] for g in expected]


# ---- bad input ----

def test_text_search_bad_input_fails_in_one_line_before_the_model_is_built(weights, datasets_root, tmp_path):
    query_dir, gallery_dir = split_dirs(datasets_root)
    first_query = sorted(query_dir.glob("*.jpg"))[0]
    (tmp_path / "partial.json").write_text(json.dumps({first_query.name: WORDS}))
    (tmp_path / "stranger.json").write_text(json.dumps({"0001_c1s1_000000_01.jpg": WORDS}))
    (tmp_path / "list.json").write_text(json.dumps([WORDS]))
    (tmp_path / "blank.json").write_text(json.dumps({"q": " "}))
    folders = ["--images", str(gallery_dir)]
    with_query = ["--query", str(query_dir), *folders]
    psg = ["--config-file", PROMPTSG_CFG]
    cases = [
        (psg, [*folders, "--text", ""], "--text: the words are empty"),
        (psg, [*with_query, "--text", " . "], "--text: the words are empty"),
        (psg, [*folders, "--text-file", str(tmp_path / "blank.json")],
         f"--text-file {tmp_path / 'blank.json'}: the words for 'q' are empty"),
        (psg, [*folders, "--text-file", str(tmp_path / "list.json")],
         f"--text-file: {tmp_path / 'list.json'} must hold a non-empty JSON object"),
        (psg, [*folders, "--text-file", str(tmp_path / "missing.json")],
         f"--text-file: cannot read {tmp_path / 'missing.json'}"),
        (psg, [*with_query, "--text-file", str(tmp_path / "partial.json")],
         f"--text-file {tmp_path / 'partial.json'}: no words for {len(list(query_dir.glob('*.jpg'))) - 1} of the "),
        (psg, [*with_query, "--text-file", str(tmp_path / "stranger.json")],
         f"--text-file {tmp_path / 'stranger.json'}: '0001_c1s1_000000_01.jpg' is none of the --query images"),
        (["--config-file", BASELINE_CFG], [*with_query, "--text", WORDS],
         '--text with --query composes "A photo of a s* person <words>." for PromptSG\'s inversion network and MIM; '
         "this model has no inversion network"),
        (["--config-file", BASELINE_CFG], [*folders, "--text", WORDS],
         "--text: this model has no text tower of its own and MODEL.CLIP.PRETRAINED is empty"),
    ]
    tool = load_extract_tool()
    for config, args, message in cases:
        weights_file = weights["baseline" if BASELINE_CFG in config else "promptsg"]
        with pytest.raises(InputError, match="^" + re.escape(message)) as info:
            tool.main([*config, *args, "--output", str(tmp_path / "out"), *TINY, "MODEL.WEIGHTS", weights_file])
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"^--text: the prompt 'A photo of a person (red ){79}red\.' is 88 tokens, "
                                         r"more than the text tower's context of 77$"):
        tool.main([*psg, *folders, "--text", "red " * 80, "--output", str(tmp_path / "out"), *TINY,
                   "MODEL.WEIGHTS", weights["promptsg"]])
    assert not (tmp_path / "out").exists()                      # nothing written, nothing built

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "--config-file",
                             BOT_CFG, *with_query, "--text", WORDS, "--output", str(tmp_path / "out"),
                             "MODEL.WEIGHTS", weights["promptsg"]],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    one_line_error(result, "--text needs a CLIP model", "builds Baseline")
