"""What the end-to-end tests share: tools/train_net.py on the tiny synthetic split with a tiny CLIP
(seconds per run on two cores), the one-line error every bad input must give, and the tools
imported by name (tools/ and tools/perf/ are on the path) to call their ``main(argv)``."""
import importlib
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
PROMPTSG_CFG = os.path.join(ROOT, "projects/PromptSG/configs/Synthetic/promptsg_small_vit.yml")
BASELINE_CFG = os.path.join(ROOT, "projects/PromptSG/configs/Synthetic/clip_baseline_small_vit.yml")
BOT_CFG = os.path.join(ROOT, "configs/Synthetic/bagtricks_R18.yml")
for folder in ("tools", os.path.join("tools", "perf")):     # the tools, importable by name
    if os.path.join(ROOT, folder) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, folder))

TINY = ["DATASETS.NAMES", '("SyntheticMarketTiny",)', "DATASETS.TESTS", '("SyntheticMarketTiny",)',
        "MODEL.CLIP.NAME", "tiny-ViT", "MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.STRIDE", "16",
        "MODEL.PROMPTSG.MIM.HEADS", "2",
        "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "SOLVER.IMS_PER_BATCH", "16",
        "SOLVER.MAX_EPOCH", "2", "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "2",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "64"]


def make_tiny_datasets(root):
    """The tiny synthetic split under ``root`` (FastReID's datasets root)."""
    from fastreid.data.datasets import DATASET_REGISTRY

    DATASET_REGISTRY.get("SyntheticMarketTiny")(root=str(root))
    return root


def run(args, root, timeout=600):
    """tools/train_net.py ``args`` with FASTREID_DATASETS=``root``; the CompletedProcess. Without an
    OUTPUT_DIR in ``args`` the run writes into a new temporary folder, never into the config's
    (a folder under the repository's logs/, which a user's run may hold)."""
    if "OUTPUT_DIR" not in args:
        args = [*args, "OUTPUT_DIR", tempfile.mkdtemp(prefix="promptsg-test-run-")]
    env = dict(os.environ, FASTREID_DATASETS=str(root), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, TRAIN_NET, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(result, *fragments, before_training=True):
    """The run failed with one last line ``error: ...`` holding every fragment (before training
    started, unless ``before_training`` is False); returns that line."""
    assert result.returncode != 0, result.stdout[-1000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    if before_training:
        assert "Starting training" not in result.stdout + result.stderr
    return last


def load_tool(path):
    """A tool script (``path`` relative to the repository, e.g. "tools/compare.py"), imported by its
    name from tools/ or tools/perf/, whose ``main(argv)`` the tests call."""
    return importlib.import_module(os.path.splitext(os.path.basename(path))[0])


def load_extract_tool():
    """tools/extract_features.py as a module."""
    return load_tool("tools/extract_features.py")


def market_ids(path):
    """(person id, camera id) from a Market-1501 file name such as 0002_c1s1_000451_03.jpg."""
    name = os.path.basename(path)
    return int(name.split("_")[0]), int(name.split("_")[1][1])
