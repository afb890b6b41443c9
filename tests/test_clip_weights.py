"""create_clip_model: checkpoint formats, errors, and positional-embedding resizing."""
import logging
import warnings

import promptsg  # noqa: F401  (patches FastReID, registers the backbone)

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU

from fastreid.config import get_cfg

from promptsg.config import add_promptsg_config
from promptsg.modeling.clip_backbone import CLIPVisualBackbone
from promptsg.modeling.clip_weights import (
    clip_model_from_config, create_clip_model, resize_grid_pos_embed, set_resnet_last_stride)

TEXT = open_clip.tokenize(["a photo of a person.", "a photo of a red car."])


def _images(height=224, width=224, batch=2, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _source_model(name, quick_gelu=False, seed=0):
    """A tiny open_clip model with non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, force_quick_gelu=quick_gelu)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _bilinear_grid(pos_embed, old_grid, new_grid):
    """Independent reference: F.interpolate on the grid rows, row 0 kept."""
    grid = pos_embed[1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False)
    return torch.cat([pos_embed[:1], grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)])


def _assert_same_outputs(loaded, source):
    """Same encode_image / encode_text, and the same embedding through CLIPVisualBackbone."""
    loaded.eval()
    images = _images(batch=1)
    with torch.no_grad():
        expected = source.encode_image(images)
        torch.testing.assert_close(loaded.encode_image(images), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded.encode_text(TEXT), source.encode_text(TEXT), rtol=1e-6, atol=1e-6)
        wrapped = CLIPVisualBackbone(loaded.visual, image_size=(224, 224)).eval()
        torch.testing.assert_close(wrapped(images).embedding, expected, rtol=1e-6, atol=1e-6)


# ---- positional-embedding resizing ----

def test_resize_to_same_grid_is_identity():
    pos_embed = torch.randn(1 + 16 * 8, 32)
    assert torch.equal(resize_grid_pos_embed(pos_embed, (16, 8), (16, 8)), pos_embed)


def test_resize_2x2_to_4x4_matches_bilinear_interpolate_and_keeps_cls():
    pos_embed = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)  # CLS + 2x2 grid, C = 3
    resized = resize_grid_pos_embed(pos_embed, (2, 2), (4, 4))
    assert resized.shape == (17, 3)
    assert torch.equal(resized[0], pos_embed[0])
    grid = pos_embed[1:].T.reshape(1, 3, 2, 2)  # (1, C, 2, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized[1:], expected.reshape(3, 16).T)
    # corners of a bilinear (half-pixel) upsampling keep the corner values
    assert torch.equal(resized[1], pos_embed[1]) and torch.equal(resized[16], pos_embed[4])


def test_resize_non_square_grid_matches_bilinear_interpolate():
    pos_embed = torch.randn(1 + 16 * 8, 8)
    resized = resize_grid_pos_embed(pos_embed, (16, 8), (21, 10))
    torch.testing.assert_close(resized, _bilinear_grid(pos_embed, (16, 8), (21, 10)))


# ---- resolution of created models ----

@pytest.mark.parametrize("stride, grid", [(None, (16, 8)), (16, (16, 8)), (12, (21, 10))])
def test_vit_model_at_256x128_has_grid_for_stride(stride, grid):
    model = create_clip_model("tiny-ViT", "", (256, 128), patch_stride=stride)
    assert model.visual.positional_embedding.shape == (1 + grid[0] * grid[1], 64)
    assert tuple(model.visual.grid_size) == grid
    assert model.visual.conv1.stride == ((stride or 16),) * 2
    assert model.encode_image(_images(256, 128)).shape == (2, 64)


def test_resnet_model_at_256x128_has_8x4_attnpool_grid():
    model = create_clip_model("tiny-RN", "", (256, 128)).eval()
    assert model.visual.attnpool.positional_embedding.shape == (1 + 8 * 4, 16 * 32)
    assert model.visual.attnpool.grid_size == (8, 4)
    assert model.encode_image(_images(256, 128)).shape == (2, 64)


# ---- RN50's last stride (re-ID convention, CLIP-ReID) ----

def test_resnet_last_stride_1_gives_a_16x8_map_and_a_16x8_attnpool_grid(tmp_path):
    source = _source_model("tiny-RN")
    path = str(tmp_path / "native.pt")
    torch.save(source.state_dict(), path)
    model = create_clip_model("tiny-RN", path, (256, 128), last_stride=1, activation="gelu").eval()
    visual = model.visual
    expected = _bilinear_grid(source.visual.attnpool.positional_embedding.detach(), (7, 7), (16, 8))
    torch.testing.assert_close(visual.attnpool.positional_embedding.detach(), expected)
    assert visual.attnpool.grid_size == (16, 8)
    with torch.no_grad():
        layer4 = visual.forward_intermediates(_images(256, 128), indices=[4], intermediates_only=True)
        out = CLIPVisualBackbone(visual, image_size=(256, 128)).eval()(_images(256, 128))
    assert layer4["image_intermediates"][0].shape[-2:] == (16, 8)
    assert out.tokens.shape == (2, 128, 64) and out.embedding.shape == (2, 64)


def test_resnet_last_stride_2_is_last_stride_1_average_pooled_before_the_last_relu():
    """Bottleneck's 2x2 pools commute with its 1x1 convolutions and eval-mode BatchNorms, so the
    first layer4 block at stride 2 is the stride-1 block's pre-activation, 2x2 average pooled."""
    torch.manual_seed(0)
    stride2 = _source_model("tiny-RN")
    stride1 = _source_model("tiny-RN")
    set_resnet_last_stride(stride1.visual, 1)
    assert list(stride1.state_dict()) == list(stride2.state_dict())          # checkpoints unchanged
    blocks = [m.visual.layer4[0] for m in (stride1, stride2)]
    for block in blocks:
        block.act3 = torch.nn.Identity()
    x = torch.randn(2, blocks[0].conv1.in_channels, 8, 4)
    with torch.no_grad():
        full, pooled = (block(x) for block in blocks)
    assert full.shape[-2:] == (8, 4) and pooled.shape[-2:] == (4, 2)
    torch.testing.assert_close(pooled, F.avg_pool2d(full, 2), rtol=1e-5, atol=1e-6)


def test_resnet_last_stride_must_be_1_or_2():
    with pytest.raises(ValueError, match="last_stride must be 1 or 2 for a CLIP ModifiedResNet, got 3"):
        create_clip_model("tiny-RN", "", (256, 128), last_stride=3)


# ---- checkpoint formats ----

@pytest.mark.parametrize("name", ["tiny-ViT", "tiny-RN"])
def test_openai_torchscript_archive_loads_with_quickgelu(name, tmp_path):
    source = _source_model(name, quick_gelu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            source,
            {"encode_image": (_images(),), "encode_text": (TEXT,)},
            check_trace=False,
        )
        path = str(tmp_path / "openai.pt")
        torch.jit.save(traced, path)
    loaded = create_clip_model(name, path, (224, 224))
    assert isinstance(loaded.transformer.resblocks[0].mlp.gelu, QuickGELU)
    _assert_same_outputs(loaded, source)


@pytest.mark.parametrize("name", ["tiny-ViT", "tiny-RN"])
def test_plain_state_dict_loads(name, tmp_path):
    source = _source_model(name)
    path = str(tmp_path / "clip_state_dict.pth")
    torch.save(source.state_dict(), path)
    _assert_same_outputs(create_clip_model(name, path, (224, 224), activation="gelu"), source)


def test_open_clip_training_checkpoint_loads(tmp_path):
    source = _source_model("tiny-ViT")
    path = str(tmp_path / "epoch_3.pt")
    state_dict = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state_dict}, path)
    _assert_same_outputs(create_clip_model("tiny-ViT", path, (224, 224), activation="gelu"), source)


@pytest.mark.parametrize("stride, grid", [(16, (16, 8)), (12, (21, 10))])
def test_native_vit_checkpoint_is_resized_once_to_256x128(stride, grid, tmp_path):
    source = _source_model("tiny-ViT")
    path = str(tmp_path / "native.pt")
    torch.save(source.state_dict(), path)
    model = create_clip_model("tiny-ViT", path, (256, 128), patch_stride=stride, activation="gelu").eval()
    native = source.visual.positional_embedding.detach()
    expected = _bilinear_grid(native, (14, 14), grid)  # straight from 14x14
    assert torch.equal(model.visual.positional_embedding[0], native[0])
    torch.testing.assert_close(model.visual.positional_embedding.detach(), expected)
    assert model.encode_image(_images(256, 128)).shape == (2, 64)


def test_native_resnet_checkpoint_attnpool_resized_to_8x4(tmp_path):
    source = _source_model("tiny-RN")
    path = str(tmp_path / "native.pt")
    torch.save(source.state_dict(), path)
    model = create_clip_model("tiny-RN", path, (256, 128), activation="gelu").eval()
    expected = _bilinear_grid(source.visual.attnpool.positional_embedding.detach(), (7, 7), (8, 4))
    torch.testing.assert_close(model.visual.attnpool.positional_embedding.detach(), expected)
    assert model.encode_image(_images(256, 128)).shape == (2, 64)


def test_checkpoint_saved_at_256x128_reloads_without_resizing(tmp_path):
    first = create_clip_model("tiny-ViT", "", (256, 128))
    path = str(tmp_path / "reid.pt")
    torch.save(first.state_dict(), path)
    again = create_clip_model("tiny-ViT", path, (256, 128), activation="gelu")
    assert torch.equal(again.visual.positional_embedding, first.visual.positional_embedding)


# ---- the activation: OpenAI's QuickGELU or GELU, never a silent guess ----

def test_plain_state_dict_of_a_plain_model_name_is_refused_until_the_activation_is_named(tmp_path):
    path = str(tmp_path / "openai_state_dict.pt")
    torch.save(_source_model("tiny-ViT", quick_gelu=True).state_dict(), path)
    with pytest.raises(ValueError) as error:
        create_clip_model("tiny-ViT", path)
    message = str(error.value)
    assert f"pretrained={path}" in message and "set activation quick_gelu" in message and "\n" not in message


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_named_activation_builds_it_and_reproduces_the_source(quick_gelu, tmp_path):
    source = _source_model("tiny-ViT", quick_gelu=quick_gelu)
    path = str(tmp_path / "state_dict.pt")
    torch.save(source.state_dict(), path)
    loaded = create_clip_model("tiny-ViT", path, (224, 224), activation="quick_gelu" if quick_gelu else "gelu")
    assert isinstance(loaded.transformer.resblocks[0].mlp.gelu, QuickGELU) == quick_gelu
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, QuickGELU) == quick_gelu
    _assert_same_outputs(loaded, source)


def test_the_wrong_activation_changes_the_features(tmp_path):
    """Why the choice must not be silent: QuickGELU weights run with GELU give other features."""
    source = _source_model("tiny-ViT", quick_gelu=True)
    path = str(tmp_path / "state_dict.pt")
    torch.save(source.state_dict(), path)
    wrong = create_clip_model("tiny-ViT", path, (224, 224), activation="gelu").eval()
    with torch.no_grad():
        assert not torch.allclose(wrong.encode_image(_images(batch=1)), source.encode_image(_images(batch=1)),
                                  rtol=1e-3, atol=1e-4)


def test_quickgelu_model_name_needs_no_activation(tmp_path):
    config = open_clip.get_model_config("tiny-ViT")          # registered as a "-quickgelu" twin
    open_clip.factory._MODEL_CONFIGS["tiny-ViT-quickgelu"] = {**config, "quick_gelu": True}
    try:
        source = _source_model("tiny-ViT", quick_gelu=True)
        path = str(tmp_path / "state_dict.pt")
        torch.save(source.state_dict(), path)
        loaded = create_clip_model("tiny-ViT-quickgelu", path, (224, 224))
    finally:
        del open_clip.factory._MODEL_CONFIGS["tiny-ViT-quickgelu"]
    assert isinstance(loaded.transformer.resblocks[0].mlp.gelu, QuickGELU)
    _assert_same_outputs(loaded, source)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match=r"activation must be one of \['', 'quick_gelu', 'gelu'\], got 'relu'"):
        create_clip_model("tiny-ViT", "", activation="relu")


def test_tag_is_downloaded_by_open_clip_then_loaded_as_a_file(tmp_path, monkeypatch):
    source = _source_model("tiny-ViT", quick_gelu=True)
    path = str(tmp_path / "downloaded.bin")
    torch.save(source.state_dict(), path)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"quick_gelu": True, "url": "x"})
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg: path)
    _assert_same_outputs(create_clip_model("tiny-ViT", "sometag", (224, 224)), source)


# ---- errors ----

def test_missing_file_raises_one_line_file_not_found(tmp_path):
    path = str(tmp_path / "nowhere" / "ViT-B-16.pt")
    with pytest.raises(FileNotFoundError) as error:
        create_clip_model("tiny-ViT", path)
    message = str(error.value)
    assert f"pretrained={path}" in message and "\n" not in message


def test_mismatched_checkpoint_raises_value_error_naming_file_and_keys(tmp_path):
    path = str(tmp_path / "rn_weights.pt")
    torch.save(_source_model("tiny-RN").state_dict(), path)
    with pytest.raises(ValueError) as error:
        create_clip_model("tiny-ViT", path, activation="gelu")
    message = str(error.value)
    assert path in message and "visual." in message and "\n" not in message


def test_shape_mismatch_is_reported_with_the_key(tmp_path):
    state_dict = _source_model("tiny-ViT").state_dict()
    state_dict["visual.proj"] = torch.zeros(64, 32)
    path = str(tmp_path / "bad.pt")
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): visual\.proj \(64, 32\) vs \(64, 64\)"):
        create_clip_model("tiny-ViT", path, activation="gelu")


def test_unreadable_file_raises_value_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read CLIP weights"):
        create_clip_model("tiny-ViT", str(path))


def test_unknown_tag_raises_value_error_naming_tag():
    with pytest.raises(ValueError, match="'laion-nope' is neither a file nor an open_clip pretrained tag"):
        create_clip_model("tiny-ViT", "laion-nope")


def test_failed_download_raises_one_line_naming_tag_and_model(monkeypatch):
    def offline(cfg):
        raise OSError("Network is unreachable\nmore details")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(RuntimeError) as error:
        create_clip_model("ViT-B-16", "openai")
    message = str(error.value)
    assert "'openai'" in message and "'ViT-B-16'" in message and "local file" in message
    assert "\n" not in message


def test_empty_pretrained_warns_about_random_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="promptsg.modeling.clip_weights"):
        create_clip_model("tiny-ViT", "")
    assert any("random" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_unknown_model_name_raises_value_error():
    with pytest.raises(ValueError, match="name='tiny-nothing' is not an open_clip model config"):
        create_clip_model("tiny-nothing")


# ---- the same errors in a config's words ----

def _config(**keys):
    """A PromptSG config on tiny-ViT at 64x32 with ``keys`` ({"MODEL.CLIP.NAME": value, ...}) set."""
    cfg = add_promptsg_config(get_cfg())
    cfg.MODEL.CLIP.NAME, cfg.INPUT.SIZE_TRAIN = "tiny-ViT", [64, 32]
    cfg.merge_from_list([item for key, value in keys.items() for item in (key, str(value))])
    return cfg


def _plain_state_dict(tmp_path):
    path = str(tmp_path / "state_dict.pt")
    torch.save(_source_model("tiny-ViT", quick_gelu=True).state_dict(), path)
    return path


@pytest.mark.parametrize("case", ["activation", "undeclared", "missing", "name", "tag", "last_stride"])
def test_an_error_names_the_argument_called_directly_and_the_config_key_built_from_a_config(case, tmp_path):
    """create_clip_model speaks of its arguments; clip_model_from_config gives the same error with
    the keys the arguments came from (MODEL.CLIP.*, MODEL.BACKBONE.LAST_STRIDE), and the same type."""
    path = _plain_state_dict(tmp_path)
    missing = str(tmp_path / "nowhere.pt")
    arguments, keys, argument_words, key_words = {
        "activation": ({"activation": "relu"}, {"MODEL.CLIP.ACTIVATION": "relu"},
                       "activation must be one of", "MODEL.CLIP.ACTIVATION must be one of"),
        "undeclared": ({"pretrained": path}, {"MODEL.CLIP.PRETRAINED": path},
                       f"pretrained={path} is a state dict", f"MODEL.CLIP.PRETRAINED={path} is a state dict"),
        "missing": ({"pretrained": missing}, {"MODEL.CLIP.PRETRAINED": missing},
                    f"pretrained={missing}: no such file", f"MODEL.CLIP.PRETRAINED={missing}: no such file"),
        "name": ({"name": "tiny-nothing"}, {"MODEL.CLIP.NAME": "tiny-nothing"},
                 "name='tiny-nothing' is not", "MODEL.CLIP.NAME='tiny-nothing' is not"),
        "tag": ({"pretrained": "laion-nope"}, {"MODEL.CLIP.PRETRAINED": "laion-nope"},
                "pretrained='laion-nope' is neither", "MODEL.CLIP.PRETRAINED='laion-nope' is neither"),
        "last_stride": ({"name": "tiny-RN", "last_stride": 3}, {"MODEL.CLIP.NAME": "tiny-RN", "MODEL.BACKBONE.LAST_STRIDE": 3},
                        "last_stride must be 1 or 2", "MODEL.BACKBONE.LAST_STRIDE must be 1 or 2"),
    }[case]
    direct = {"name": "tiny-ViT", "image_size": (64, 32), **arguments}
    with pytest.raises(Exception) as called:
        create_clip_model(**direct)
    with pytest.raises(Exception) as configured:
        clip_model_from_config(_config(**keys))
    assert argument_words in str(called.value) and "MODEL." not in str(called.value)
    assert key_words in str(configured.value) and "\n" not in str(configured.value)
    assert type(configured.value) is type(called.value)
    assert isinstance(called.value, (ValueError, FileNotFoundError))


def test_clip_model_from_config_builds_what_create_clip_model_builds(tmp_path):
    path = _plain_state_dict(tmp_path)
    cfg = _config(**{"MODEL.CLIP.PRETRAINED": path, "MODEL.CLIP.ACTIVATION": "quick_gelu",
                               "MODEL.CLIP.STRIDE": 12})
    configured = clip_model_from_config(cfg)
    called = create_clip_model("tiny-ViT", path, (64, 32), patch_stride=12, activation="quick_gelu")
    assert configured.visual.conv1.stride == (12, 12) and configured.visual.grid_size == called.visual.grid_size
    for (key, a), (_, b) in zip(configured.state_dict().items(), called.state_dict().items()):
        assert torch.equal(a, b), key
