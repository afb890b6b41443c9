"""SyntheticMarket and SyntheticMarketTiny in FastReID's DATASET_REGISTRY, and regenerate_dataset."""
import os
import os.path as osp
import re

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset

from .captions import _generate_pool_into
from .folders import MANIFEST_NAME, SPLIT_DIRS, _MARKET, _POOL, _generate_or_reuse, _read_manifest
from .market import (DEFAULT_HEIGHT, DEFAULT_NUM_CAMERAS, DEFAULT_NUM_DISTRACTORS, DEFAULT_NUM_JUNK,
                     DEFAULT_NUM_TEST_IDS, DEFAULT_NUM_TRAIN_IDS, DEFAULT_SEED, DEFAULT_WIDTH, _generate_into,
                     generate_synthetic_market)

_NAME_RE = re.compile(r"^([-\d]+)_c(\d)s1_\d+_\d+\.jpg$")


def regenerate_dataset(dataset_dir):
    """Write ``dataset_dir`` afresh with the parameters of its manifest and this generator
    version (its files are replaced, added files included); returns the new manifest."""
    manifest = _read_manifest(dataset_dir, _MARKET) or _read_manifest(dataset_dir, _POOL)
    if manifest is None:
        raise ValueError(f"no {MANIFEST_NAME} of generate_synthetic_market or generate_caption_pool: "
                         f"not a generated dataset, left as it is")
    layouts = {_MARKET.generator: (_MARKET, _generate_into), _POOL.generator: (_POOL, _generate_pool_into)}
    layout, generate_into = layouts[manifest["generator"]]
    return _generate_or_reuse(dataset_dir, layout, manifest["params"], generate_into, regenerate=True)


# ----------------------------------------------------------------------------
# FastReID dataset
# ----------------------------------------------------------------------------

@DATASET_REGISTRY.register()
class SyntheticMarket(ImageDataset):
    """FastReID view of the synthetic dataset, generated into ``root/SyntheticMarket`` on first use.

    Parsing follows ``Market1501.process_dir``: pid 0 (distractors) stays in the
    gallery, pid -1 (junk) is skipped, camera ids become 0-based, and training
    pids/camids are prefixed with ``dataset_name``.  The size keywords are passed
    to :func:`generate_synthetic_market`; FastReID's loaders pass none, so train
    and test loaders agree on the default dataset.
    """
    _junk_pids = [0, -1]
    dataset_dir = "SyntheticMarket"
    dataset_name = "synthetic"

    def __init__(
        self,
        root="datasets",
        seed=DEFAULT_SEED,
        num_train_ids=DEFAULT_NUM_TRAIN_IDS,
        num_test_ids=DEFAULT_NUM_TEST_IDS,
        num_cameras=DEFAULT_NUM_CAMERAS,
        num_distractors=DEFAULT_NUM_DISTRACTORS,
        num_junk=DEFAULT_NUM_JUNK,
        height=DEFAULT_HEIGHT,
        width=DEFAULT_WIDTH,
        **kwargs,
    ):
        self.root = root
        self.dataset_dir = osp.join(self.root, self.dataset_dir)
        self.manifest = generate_synthetic_market(
            self.dataset_dir, seed=seed, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
            num_cameras=num_cameras, num_distractors=num_distractors, num_junk=num_junk,
            height=height, width=width,
        )
        self.train_dir = osp.join(self.dataset_dir, SPLIT_DIRS["train"])
        self.query_dir = osp.join(self.dataset_dir, SPLIT_DIRS["query"])
        self.gallery_dir = osp.join(self.dataset_dir, SPLIT_DIRS["gallery"])
        self.check_before_run([self.dataset_dir, self.train_dir, self.query_dir, self.gallery_dir])

        train = lambda: self.process_dir(self.train_dir)
        query = lambda: self.process_dir(self.query_dir, is_train=False)
        gallery = lambda: self.process_dir(self.gallery_dir, is_train=False)
        super().__init__(train, query, gallery, **kwargs)

    @property
    def num_train_pids(self):
        return self.get_num_pids(self.train)

    @property
    def num_train_cams(self):
        return self.get_num_cams(self.train)

    def process_dir(self, dir_path, is_train=True):
        data = []
        # Sorted, and parsed from the file name only (not the whole path), unlike Market1501.
        for name in sorted(os.listdir(dir_path)):
            match = _NAME_RE.match(name)
            if match is None:
                continue
            pid, camid = map(int, match.groups())
            if pid == -1:
                continue  # junk images are ignored, as in Market-1501
            camid -= 1  # index starts from 0
            if is_train:
                pid = self.dataset_name + "_" + str(pid)
                camid = self.dataset_name + "_" + str(camid)
            data.append((osp.join(dir_path, name), pid, camid))
        return data


@DATASET_REGISTRY.register()
class SyntheticMarketTiny(SyntheticMarket):
    """A tiny split of the same generator (8 train / 8 test identities, about 80 + 70 images) for
    smoke tests and CI: a run trains and evaluates in seconds. Keywords override the sizes."""
    dataset_dir = "SyntheticMarketTiny"
    dataset_name = "synthetic_tiny"

    def __init__(self, root="datasets", **kwargs):
        sizes = {"num_train_ids": 8, "num_test_ids": 8, "num_distractors": 20, "num_junk": 2}
        super().__init__(root, **{**sizes, **kwargs})
