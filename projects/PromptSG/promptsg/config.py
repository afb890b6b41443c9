"""Config keys added by the PromptSG project (paper symbols in brackets)."""
import re

from fastreid.config import CfgNode as CN

from .modeling.clip_weights import ACTIVATIONS, CONFIG_KEYS, RESNET_STRIDE_BEFORE_LAYER4, ClipArgumentError, model_config
from .modeling.interaction import FUSIONS, MAP_FUSIONS, MAP_KEYS, MAP_PRIORS, REMOVED_FUSIONS
from .modeling.supcon import POSITIVE_REDUCTIONS


def add_promptsg_config(cfg):
    """Add PromptSG's keys to a FastReID config. Idempotent."""
    if "CLIP" in cfg.MODEL:
        return cfg

    # ---- Trained checkpoints (promptsg/engine/checkpoint.py) ----
    # MODEL.WEIGHTS must match the model whole. True: it comes from training on another dataset,
    # and its ID classifier (another number of identities) is left out and trained anew (logged).
    cfg.MODEL.WEIGHTS_NEW_CLASSIFIER = False

    # ---- CLIP towers (open_clip) ----
    cfg.MODEL.CLIP = CN()
    # open_clip model name: "ViT-B-16", "RN50", ... or a tiny config shipped in
    # projects/PromptSG/configs/clip/ ("tiny-ViT", "tiny-RN").
    cfg.MODEL.CLIP.NAME = "ViT-B-16"
    # Weights: "" (random CLIP weights, loud warning), an open_clip pretrained tag
    # ("openai", "laion2b_s34b_b88k"; downloads), or a local file (OpenAI TorchScript
    # archive, plain state dict, or open_clip checkpoint).
    cfg.MODEL.CLIP.PRETRAINED = ""
    # MLP activation the weights were trained with: "quick_gelu" (OpenAI's CLIP), "gelu", or ""
    # to read it from the weights (TorchScript archive, open_clip tag, "-quickgelu" name); a plain
    # state dict under another name is refused until this names it.
    cfg.MODEL.CLIP.ACTIVATION = ""
    # Patch-embedding stride of the ViT tower; < patch size gives overlapping patches.
    cfg.MODEL.CLIP.STRIDE = 16
    # SIE: a learnable per-camera embedding added to the CLS token (ViT only).
    cfg.MODEL.CLIP.SIE_CAMERA = False
    # Scale of the SIE camera embedding.
    cfg.MODEL.CLIP.SIE_COE = 1.0
    # Number of cameras for SIE; 0 = read from the training set.
    cfg.MODEL.CLIP.NUM_CAMERAS = 0

    # ---- PromptSG method ----
    cfg.MODEL.PROMPTSG = CN()
    # Prompt with the placeholder word X that the pseudo token s* replaces.
    cfg.MODEL.PROMPTSG.PROMPT = "A photo of a X person."
    # Simplified prompt, used where no s* is composed.
    cfg.MODEL.PROMPTSG.SIMPLE_PROMPT = "A photo of a person."
    # Compose s* = f_theta(v) into the prompt during training (Table 4: False = w/o composed).
    cfg.MODEL.PROMPTSG.COMPOSE_TRAIN = True
    # Prompt used at test time: "simplified" (cached text embedding) or "composed" (per-image s*).
    cfg.MODEL.PROMPTSG.INFERENCE_PROMPT = "simplified"
    # Beyond the paper: share of training images whose MIM query is the simplified prompt's
    # embedding instead of their composed prompt's (trains the MIM for the test-time simplified
    # prompt; L_SupCon still ties every image to its composed prompt). 0 = the paper.
    cfg.MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE = 0.0
    # Hidden width of the inversion network f_theta (Sec. 4.1, 3-layer MLP).
    cfg.MODEL.PROMPTSG.INVERSION_HIDDEN = 512
    # Initial scale and shift of f_theta's last BatchNorm: "token" (the per-dimension std and mean
    # of the text tower's word embeddings: s* starts at a word's scale) or "unit" (PyTorch's 1, 0).
    cfg.MODEL.PROMPTSG.PSEUDO_TOKEN_INIT = "token"

    # Multimodal interaction module (Sec. 4.2, Table 5).
    cfg.MODEL.PROMPTSG.MIM = CN()
    # Number of text-as-query cross-attention layers (0 = no MIM, Table 3 row d).
    cfg.MODEL.PROMPTSG.MIM.CROSS_LAYERS = 1
    # Number of self-attention transformer blocks after the cross-attention.
    cfg.MODEL.PROMPTSG.MIM.SELF_LAYERS = 2
    # Attention heads of the MIM (its width is CLIP's joint embedding width).
    cfg.MODEL.PROMPTSG.MIM.HEADS = 8
    # Query of the cross-attention: "pooled" (the EOT text embedding l_p) or
    # "tokens" (every prompt token, projected to the joint space).
    cfg.MODEL.PROMPTSG.MIM.QUERY = "pooled"
    # How the cross-attention's result reaches the feature (promptsg/modeling/interaction.py):
    # "learned_map" (the prompt's learned map over the patches biases v's attention logits in the
    # self-attention blocks; the feature is read at v) or "attention" (x = A(q, P), Eq. 7 as
    # written). Removed wirings ("query_residual", "visual_residual", "reweight", "clip_map") are
    # refused; their results are in docs/EXPERIMENTS.md.
    cfg.MODEL.PROMPTSG.MIM.FUSION = "learned_map"
    # learned_map's contrast: the map is softmax(MAP_CONTRAST * z) of its logits z standardised
    # over the patches.
    cfg.MODEL.PROMPTSG.MIM.MAP_CONTRAST = 2.0
    # learned_map's prior: "" (none) or "cls_attention" (the map is softmax(MAP_CONTRAST * z + log c),
    # c the ViT encoder's last-block CLS attention over the patches: the prompt re-weights where the
    # encoder looks).
    cfg.MODEL.PROMPTSG.MIM.MAP_PRIOR = ""
    # The power of the prior: the map is softmax(MAP_CONTRAST * z + MAP_PRIOR_POWER * log c); above 1
    # sharpens c onto where the encoder looks most. Read only with MAP_PRIOR.
    cfg.MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER = 1.0
    # learned_map's keys: "" (the patch tokens the self-attention blocks read) or "penultimate" (the
    # ViT encoder's patch tokens before its last block, taken to the joint space by ln_post and proj).
    # The MAP_* keys are the map fusions' (learned_map); "attention" has no map and does not read them.
    # These code defaults are the wiring before the keys existed, so a run's config.yaml written then
    # loads as it trained; Base-PromptSG.yml sets the default wiring (keys, prior and power).
    cfg.MODEL.PROMPTSG.MIM.MAP_KEYS = ""
    # Test feature: "mim" (MIM output) or "concat" (MIM output ++ global visual embedding).
    cfg.MODEL.PROMPTSG.FEATURE = "mim"
    # Apply the triplet loss also to the visual encoder's last states (x_{L-1}, x_L, proj).
    cfg.MODEL.PROMPTSG.TRIPLET_ON_VISUAL_STATES = True
    # torch.compile mode for the encoders, the head and the losses: "" (eager), "default",
    # "reduce-overhead" (adds CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs".
    # Same results and checkpoints; pays a one-off compile (minutes) for faster GPU steps.
    cfg.MODEL.PROMPTSG.COMPILE = ""

    # Fused optimizer kernels (fused=True) where PyTorch has them for SOLVER.OPT and the device:
    # the same update as the default multi-tensor path, in a few kernel launches.
    cfg.SOLVER.FUSED = True

    # Symmetric supervised contrastive loss L_SupCon (Eq. 4-6), selected by
    # "SupConLoss" in MODEL.LOSSES.NAME.
    cfg.MODEL.LOSSES.SUPCON = CN()
    # lambda in Eq. 10.
    cfg.MODEL.LOSSES.SUPCON.SCALE = 0.5
    # Temperature tau of the cosine similarity (Eq. 1-6). 0: CLIP's own learned temperature,
    # 1 / exp(logit_scale) of the loaded weights (Eq. 1 is CLIP's zero-shot rule; OpenAI: 0.01).
    cfg.MODEL.LOSSES.SUPCON.TEMPERATURE = 0.0
    # Reduction over each anchor's positives: "sum" (Eq. 5-6) or "mean" (Khosla et al.).
    cfg.MODEL.LOSSES.SUPCON.POSITIVES = "sum"
    # Use the image-to-text term L_i2t (Table 3 row b turns it off).
    cfg.MODEL.LOSSES.SUPCON.I2T = True
    # Use the text-to-image term L_t2i (Table 3 row c turns it off).
    cfg.MODEL.LOSSES.SUPCON.T2I = True
    # Beyond the paper, for MIM.FUSION learned_map: the weight of a second L_SupCon between the
    # prompt's map pool of the patch tokens, sum_m a_m p_m, and l_p, which asks the map to pick the
    # patches the prompt describes; it trains the map's own parameters only (0: off;
    # ablations/map_pool.yml: 0.5, the prompt keeps acting at test).
    cfg.MODEL.LOSSES.SUPCON.MAP_SCALE = 0.0

    # ---- CLIP-ReID (promptsg/modeling/clip_reid.py, MODEL.META_ARCHITECTURE CLIPReID) ----
    cfg.MODEL.CLIPREID = CN()
    # Stage 1's prompt: each training identity's learnable context tokens replace the X's.
    cfg.MODEL.CLIPREID.PROMPT = "A photo of a X X X X person."
    # A stage-1 file (clip_reid_stage1.pth, written into OUTPUT_DIR by stage 1) to start stage 2
    # from instead of running stage 1; "" runs stage 1 (or, with --resume, reuses OUTPUT_DIR's).
    cfg.MODEL.CLIPREID.STAGE1_WEIGHTS = ""
    # Weight of stage 2's image-to-text cross-entropy, selected by "ImageToTextLoss" in
    # MODEL.LOSSES.NAME (the ID and triplet weights are MODEL.LOSSES.CE.SCALE and TRI.SCALE).
    cfg.MODEL.LOSSES.I2T = CN()
    cfg.MODEL.LOSSES.I2T.SCALE = 1.0
    # Stage 1's own schedule (CLIP-ReID's SOLVER.STAGE1); stage 2 is trained by FastReID's SOLVER.
    cfg.SOLVER.STAGE1 = CN()
    cfg.SOLVER.STAGE1.MAX_EPOCH = 120
    cfg.SOLVER.STAGE1.IMS_PER_BATCH = 64
    cfg.SOLVER.STAGE1.BASE_LR = 0.00035          # Adam
    cfg.SOLVER.STAGE1.WEIGHT_DECAY = 0.0001
    cfg.SOLVER.STAGE1.WARMUP_EPOCHS = 5          # linear from WARMUP_LR, then a cosine to MIN_LR
    cfg.SOLVER.STAGE1.WARMUP_LR = 0.00001
    cfg.SOLVER.STAGE1.MIN_LR = 0.000001
    # Temperature of stage 1's SupCon on the raw features.
    cfg.SOLVER.STAGE1.TEMPERATURE = 1.0

    # ---- Evaluation (promptsg/engine/evaluation.py) ----
    # Queries ranked at a time by the bounded-memory evaluation (distances, re-ranking, AP / CMC /
    # mINP for one chunk of queries against the gallery; FastReID's metrics, equal to its dense
    # path). 0: FastReID's dense path (a queries x gallery matrix and its argsort in memory).
    cfg.TEST.QUERY_CHUNK = 256

    # Seed of torch, NumPy and Python's RNGs (process k of a distributed run: SEED + k), set by
    # tools/train_net.py before the model and the data loaders are built. -1: FastReID's own
    # behaviour, a fresh random seed each run (written to the log).
    cfg.SEED = -1
    return cfg


_LOSSES = ("CrossEntropyLoss", "TripletLoss", "SupConLoss")
CLIPREID_LOSSES = ("CrossEntropyLoss", "TripletLoss", "ImageToTextLoss")
# The meta-architectures built on CLIP's towers (MODEL.CLIP.*).
CLIP_ARCHITECTURES = ("PromptSG", "CLIPReID")
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate_promptsg_config(cfg):
    """Reject inconsistent PromptSG settings with one line naming the key (before training)."""
    p = cfg.MODEL.PROMPTSG
    names = cfg.MODEL.LOSSES.NAME

    def fail(message):
        raise ValueError(message)

    unknown = [n for n in names if n not in _LOSSES]
    if unknown:
        fail(f"MODEL.LOSSES.NAME: {unknown} not supported by PromptSG (choose from {list(_LOSSES)})")
    if p.INFERENCE_PROMPT not in ("simplified", "composed"):
        fail(f"MODEL.PROMPTSG.INFERENCE_PROMPT must be 'simplified' or 'composed', got {p.INFERENCE_PROMPT!r}")
    if p.COMPILE not in COMPILE_MODES:
        fail(f"MODEL.PROMPTSG.COMPILE must be one of {list(COMPILE_MODES)}, got {p.COMPILE!r}")
    if p.PSEUDO_TOKEN_INIT not in ("token", "unit"):
        fail(f"MODEL.PROMPTSG.PSEUDO_TOKEN_INIT must be 'token' or 'unit', got {p.PSEUDO_TOKEN_INIT!r}")
    if p.MIM.QUERY not in ("pooled", "tokens"):
        fail(f"MODEL.PROMPTSG.MIM.QUERY must be 'pooled' or 'tokens', got {p.MIM.QUERY!r}")
    # A model without a MIM (the CLIP baseline) has no fusion to check: its config.yaml keeps the
    # default of the release that trained it.
    if p.MIM.CROSS_LAYERS > 0 and p.MIM.FUSION in REMOVED_FUSIONS:
        fail(f"MODEL.PROMPTSG.MIM.FUSION {p.MIM.FUSION} was removed (docs/EXPERIMENTS.md, \"Language guidance at "
             f"test\", has its results); choose one of {list(FUSIONS)}")
    if p.MIM.CROSS_LAYERS > 0 and p.MIM.FUSION not in FUSIONS:
        fail(f"MODEL.PROMPTSG.MIM.FUSION must be one of {list(FUSIONS)}, got {p.MIM.FUSION!r}")
    if p.MIM.FUSION in MAP_FUSIONS and p.MIM.CROSS_LAYERS > 0 and (p.MIM.CROSS_LAYERS != 1 or p.MIM.SELF_LAYERS < 1):
        fail(f"MODEL.PROMPTSG.MIM.FUSION {p.MIM.FUSION} needs MIM.CROSS_LAYERS 1 and MIM.SELF_LAYERS >= 1 (v is read "
             f"after the self-attention blocks), got {p.MIM.CROSS_LAYERS} and {p.MIM.SELF_LAYERS}")
    if not (isinstance(p.MIM.MAP_CONTRAST, (int, float)) and 0 < p.MIM.MAP_CONTRAST < float("inf")):
        fail(f"MODEL.PROMPTSG.MIM.MAP_CONTRAST must be a positive number, got {p.MIM.MAP_CONTRAST!r}")
    if p.MIM.MAP_PRIOR not in MAP_PRIORS:
        fail(f"MODEL.PROMPTSG.MIM.MAP_PRIOR must be {' or '.join(map(repr, MAP_PRIORS))}, got {p.MIM.MAP_PRIOR!r}")
    if not (isinstance(p.MIM.MAP_PRIOR_POWER, (int, float)) and 0 < p.MIM.MAP_PRIOR_POWER < float("inf")):
        fail(f"MODEL.PROMPTSG.MIM.MAP_PRIOR_POWER must be a positive number, got {p.MIM.MAP_PRIOR_POWER!r}")
    if p.MIM.MAP_KEYS not in MAP_KEYS:
        fail(f"MODEL.PROMPTSG.MIM.MAP_KEYS must be {' or '.join(map(repr, MAP_KEYS))}, got {p.MIM.MAP_KEYS!r}")
    if p.FEATURE not in ("mim", "concat"):
        fail(f"MODEL.PROMPTSG.FEATURE must be 'mim' or 'concat', got {p.FEATURE!r}")
    if not 0.0 <= p.SIMPLIFIED_QUERY_SHARE <= 1.0:
        fail(f"MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE must be in [0, 1], got {p.SIMPLIFIED_QUERY_SHARE}")
    if p.SIMPLIFIED_QUERY_SHARE > 0 and not (p.COMPOSE_TRAIN and p.MIM.CROSS_LAYERS > 0 and p.MIM.QUERY == "pooled"):
        fail("MODEL.PROMPTSG.SIMPLIFIED_QUERY_SHARE > 0 needs COMPOSE_TRAIN, a MIM (MIM.CROSS_LAYERS > 0) "
             "and MIM.QUERY pooled")
    if p.MIM.CROSS_LAYERS < 0 or p.MIM.SELF_LAYERS < 0:
        fail("MODEL.PROMPTSG.MIM.CROSS_LAYERS and SELF_LAYERS must be >= 0")
    if p.MIM.CROSS_LAYERS > 0:
        clip_config = clip_model_config(cfg.MODEL.CLIP.NAME)
        width = clip_config.get("embed_dim", 0)                                  # E, the MIM's token width
        if not (isinstance(p.MIM.HEADS, int) and p.MIM.HEADS >= 1 and width % p.MIM.HEADS == 0):
            fail(f"MODEL.PROMPTSG.MIM.HEADS must divide {cfg.MODEL.CLIP.NAME}'s embedding width {width}, "
                 f"got {p.MIM.HEADS!r}")
        resnet = isinstance(clip_config.get("vision_cfg", {}).get("layers"), (list, tuple))
        if p.MIM.FUSION in MAP_FUSIONS and p.MIM.MAP_PRIOR and resnet:
            fail(f"MODEL.PROMPTSG.MIM.MAP_PRIOR {p.MIM.MAP_PRIOR} needs a ViT encoder's CLS attention; "
                 f"MODEL.CLIP.NAME {cfg.MODEL.CLIP.NAME} is a ModifiedResNet")
        if p.MIM.FUSION in MAP_FUSIONS and p.MIM.MAP_KEYS and resnet:
            fail(f"MODEL.PROMPTSG.MIM.MAP_KEYS {p.MIM.MAP_KEYS} needs a ViT encoder's blocks; "
                 f"MODEL.CLIP.NAME {cfg.MODEL.CLIP.NAME} is a ModifiedResNet")
    if p.MIM.CROSS_LAYERS == 0 and p.MIM.SELF_LAYERS > 0:
        fail("MODEL.PROMPTSG.MIM.SELF_LAYERS > 0 needs MIM.CROSS_LAYERS >= 1")
    if "SupConLoss" in names and not p.COMPOSE_TRAIN:
        fail("MODEL.LOSSES.NAME has SupConLoss but MODEL.PROMPTSG.COMPOSE_TRAIN is False: "
             "the loss ties images to their composed prompts")
    if cfg.MODEL.LOSSES.SUPCON.POSITIVES not in POSITIVE_REDUCTIONS:
        fail(f"MODEL.LOSSES.SUPCON.POSITIVES must be one of {list(POSITIVE_REDUCTIONS)}, "
             f"got {cfg.MODEL.LOSSES.SUPCON.POSITIVES!r}")
    if cfg.MODEL.LOSSES.SUPCON.TEMPERATURE < 0:
        fail(f"MODEL.LOSSES.SUPCON.TEMPERATURE must be > 0, or 0 for CLIP's own temperature, "
             f"got {cfg.MODEL.LOSSES.SUPCON.TEMPERATURE}")
    if cfg.MODEL.LOSSES.SUPCON.MAP_SCALE < 0:
        fail(f"MODEL.LOSSES.SUPCON.MAP_SCALE must be >= 0, got {cfg.MODEL.LOSSES.SUPCON.MAP_SCALE}")
    if cfg.MODEL.LOSSES.SUPCON.MAP_SCALE > 0 and not (
            "SupConLoss" in names and p.MIM.CROSS_LAYERS > 0 and p.MIM.FUSION in MAP_FUSIONS):
        fail("MODEL.LOSSES.SUPCON.MAP_SCALE > 0 needs SupConLoss in MODEL.LOSSES.NAME and a MIM whose FUSION is one of "
             f"{list(MAP_FUSIONS)}")
    if "SupConLoss" in names and not (cfg.MODEL.LOSSES.SUPCON.I2T or cfg.MODEL.LOSSES.SUPCON.T2I):
        fail("MODEL.LOSSES.SUPCON: both I2T and T2I are off; remove SupConLoss from MODEL.LOSSES.NAME")
    if p.INFERENCE_PROMPT == "composed" and not p.COMPOSE_TRAIN:
        fail("MODEL.PROMPTSG.INFERENCE_PROMPT composed needs COMPOSE_TRAIN True (f_theta is never trained)")
    if p.COMPOSE_TRAIN and p.MIM.CROSS_LAYERS == 0 and "SupConLoss" not in names:
        fail("MODEL.PROMPTSG.COMPOSE_TRAIN with no MIM and no SupConLoss: f_theta would get no gradient")
    validate_clip_towers(cfg)


def validate_clipreid_config(cfg):
    """Reject inconsistent CLIP-ReID settings with one line naming the key (before training)."""
    names, s1 = tuple(cfg.MODEL.LOSSES.NAME), cfg.SOLVER.STAGE1
    if sorted(names) != sorted(CLIPREID_LOSSES):
        raise ValueError(f"MODEL.LOSSES.NAME must be {list(CLIPREID_LOSSES)} for CLIPReID (the weights are "
                         f"MODEL.LOSSES.CE.SCALE, TRI.SCALE and I2T.SCALE), got {list(names)}")
    if cfg.MODEL.HEADS.NAME != "CLIPReIDHead":
        raise ValueError(f"MODEL.HEADS.NAME must be CLIPReIDHead for CLIPReID, got {cfg.MODEL.HEADS.NAME!r}")
    for key in ("MAX_EPOCH", "IMS_PER_BATCH"):
        if not (isinstance(s1[key], int) and s1[key] >= 1):
            raise ValueError(f"SOLVER.STAGE1.{key} must be an integer >= 1, got {s1[key]!r}")
    for key in ("BASE_LR", "TEMPERATURE"):
        if not s1[key] > 0:
            raise ValueError(f"SOLVER.STAGE1.{key} must be > 0, got {s1[key]!r}")
    for key in ("WARMUP_LR", "MIN_LR", "WEIGHT_DECAY", "WARMUP_EPOCHS"):
        if s1[key] < 0:
            raise ValueError(f"SOLVER.STAGE1.{key} must be >= 0, got {s1[key]!r}")
    words = re.findall(r"[\w']+", cfg.MODEL.CLIPREID.PROMPT.lower())      # as CLIP's tokenizer splits them
    marks = [i for i, word in enumerate(words) if word == "x"]
    if not marks or marks != list(range(marks[0], marks[0] + len(marks))):
        raise ValueError(f"MODEL.CLIPREID.PROMPT {cfg.MODEL.CLIPREID.PROMPT!r} must hold its placeholder words "
                         f"'X' once, next to each other (\"A photo of a X X X X person.\")")
    validate_clip_towers(cfg)


def clip_model_config(name):
    """open_clip's config of MODEL.CLIP.NAME, or a ValueError naming that key."""
    try:
        return model_config(name)
    except ClipArgumentError as exc:
        raise exc.naming(CONFIG_KEYS) from None


def validate_clip_towers(cfg):
    """What every model on CLIP's towers needs of the input and MODEL.CLIP."""
    if cfg.MODEL.HEADS.NECK_FEAT not in ("before", "after"):
        raise ValueError(f"MODEL.HEADS.NECK_FEAT must be 'before' or 'after', got {cfg.MODEL.HEADS.NECK_FEAT!r}")
    if list(cfg.INPUT.SIZE_TRAIN) != list(cfg.INPUT.SIZE_TEST):
        raise ValueError(f"INPUT.SIZE_TEST {list(cfg.INPUT.SIZE_TEST)} must equal INPUT.SIZE_TRAIN "
                         f"{list(cfg.INPUT.SIZE_TRAIN)}: CLIP's position embeddings are sized for one grid")
    if cfg.MODEL.CLIP.SIE_CAMERA and cfg.MODEL.CLIP.NUM_CAMERAS <= 0:
        raise ValueError("MODEL.CLIP.SIE_CAMERA needs MODEL.CLIP.NUM_CAMERAS > 0 (the dataset's camera count)")
    if cfg.MODEL.CLIP.ACTIVATION not in ACTIVATIONS:
        raise ValueError(f"MODEL.CLIP.ACTIVATION must be one of {list(ACTIVATIONS)}, got {cfg.MODEL.CLIP.ACTIVATION!r}")
    vision = clip_model_config(cfg.MODEL.CLIP.NAME)["vision_cfg"]
    if cfg.MODEL.CLIP.SIE_CAMERA and isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(f"MODEL.CLIP.SIE_CAMERA needs a ViT visual tower; {cfg.MODEL.CLIP.NAME} is a ModifiedResNet")
    validate_clip_image_size(cfg, vision)


def validate_clip_image_size(cfg, vision):
    """The image size against the CLIP tower (``vision``, its open_clip vision config): a ViT needs
    at least one patch and a stride within it, a ModifiedResNet a size divisible by its output stride
    (32, or 16 with MODEL.BACKBONE.LAST_STRIDE 1)."""
    size, name = list(cfg.INPUT.SIZE_TRAIN), cfg.MODEL.CLIP.NAME
    if isinstance(vision.get("layers"), (list, tuple)):   # ModifiedResNet
        if cfg.MODEL.BACKBONE.LAST_STRIDE not in (1, 2):
            raise ValueError(f"MODEL.BACKBONE.LAST_STRIDE must be 1 or 2 for a CLIP ModifiedResNet, "
                             f"got {cfg.MODEL.BACKBONE.LAST_STRIDE}")
        stride = RESNET_STRIDE_BEFORE_LAYER4 * cfg.MODEL.BACKBONE.LAST_STRIDE
        if size[0] % stride or size[1] % stride:
            raise ValueError(f"INPUT.SIZE_TRAIN {size} must be divisible by {stride}, the output stride of "
                             f"{name} at MODEL.BACKBONE.LAST_STRIDE {cfg.MODEL.BACKBONE.LAST_STRIDE}")
    else:
        patch = vision.get("patch_size", 16)
        if min(size) < patch:
            raise ValueError(f"INPUT.SIZE_TRAIN {size} is smaller than the {patch}-pixel patches of {name}")
        if not 1 <= cfg.MODEL.CLIP.STRIDE <= patch:
            raise ValueError(f"MODEL.CLIP.STRIDE must be in [1, {patch}] (the patch size of {name}), "
                             f"got {cfg.MODEL.CLIP.STRIDE}")
