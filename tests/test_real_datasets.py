"""The paper's four datasets in their real layouts, read by FastReID's own readers: the synthetic
people written as Market-1501, DukeMTMC-reID, MSMT17 V1 and V2 and CUHK03 (its MATLAB files
converted on first use), slips in those folders named in one line at start-up, and the variant a
run reads (MSMT17's version, CUHK03's boxes) in its log and results.json.

Expectations are the source files' own identities, cameras and pixels, read back independently
of the writer; FastReID's readers are the code under test."""
import json
import os
import shutil
from collections import Counter

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

import promptsg  # noqa: F401  (patches FastReID, registers CUHK03Detected)
from fastreid.config import get_cfg
from fastreid.data.datasets import DATASET_REGISTRY
from promptsg.data.real_datasets import check_real_dataset, describe_dataset
from promptsg.data.synthetic.real_layouts import LAYOUTS, read_synthetic, write_real_layout
from promptsg.engine.preflight import InputError, check_datasets, load_config

from tiny_runs import PROMPTSG_CFG, TINY, market_ids, one_line_error, run

READER = {"Market1501": "Market1501", "DukeMTMC": "DukeMTMC", "MSMT17_V1": "MSMT17", "MSMT17_V2": "MSMT17",
          "CUHK03": "CUHK03"}


@pytest.fixture(scope="module")
def source(datasets_root):
    return str(datasets_root / "SyntheticMarketTiny")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, source):
    """Each layout under its own datasets root (MSMT17's two versions cannot share one)."""
    roots = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        write_real_layout(layout, source, str(root))
        roots[layout] = root
    return roots


def source_ids(source, split, people_only=False):
    """(pid, camera) of every source image of ``split``, from its file name."""
    folder = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}[split]
    ids = [market_ids(p) for p in os.listdir(os.path.join(source, folder)) if p.endswith(".jpg")]
    return Counter(i for i in ids if i[0] > (0 if people_only else -1))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---- each layout, read by FastReID's reader ----

def test_market_and_duke_read_the_source_identities_and_cameras(layouts, source):
    market = DATASET_REGISTRY.get("Market1501")(root=str(layouts["Market1501"]))
    for split, items in (("query", market.query), ("gallery", market.gallery)):
        assert Counter((pid, cam + 1) for _, pid, cam in items) == source_ids(source, split)   # junk -1 dropped
    assert sorted(Counter(cam for _, _, cam in market.train).values()) == sorted(
        Counter(f"market1501_{cam - 1}" for _, cam in source_ids(source, "train").elements()).values())
    duke = DATASET_REGISTRY.get("DukeMTMC")(root=str(layouts["DukeMTMC"]))
    for split, items in (("query", duke.query), ("gallery", duke.gallery)):
        assert Counter((pid, cam + 1) for _, pid, cam in items) == source_ids(source, split, people_only=True)
    assert len(duke.train) == sum(source_ids(source, "train").values())


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_reads_its_lists_with_test_identities_after_the_training_ones(layouts, source, version):
    root = layouts[version]
    data = DATASET_REGISTRY.get("MSMT17")(root=str(root))
    train_pids = {pid for pid, _ in source_ids(source, "train")}
    assert len(data.train) == sum(source_ids(source, "train").values())
    assert {pid for _, pid, _ in data.query} <= set(range(len(train_pids), len(train_pids) + 100))
    # every test image keeps its camera (MSMT17 numbers them from 0) and its identity's grouping
    for split, items in (("query", data.query), ("gallery", data.gallery)):
        assert sorted(Counter(cam + 1 for _, _, cam in items).items()) == sorted(
            Counter(cam for _, cam in source_ids(source, split, people_only=True).elements()).items())
        assert sorted(Counter(pid for _, pid, _ in items).values()) == sorted(
            Counter(pid for pid, _ in source_ids(source, split, people_only=True).elements()).values())
    folder = {"MSMT17_V1": "train", "MSMT17_V2": "mask_train_v2"}[version]
    assert all(os.sep + os.path.join(version, folder) + os.sep in path for path, _, _ in data.train)
    assert describe_dataset("MSMT17", str(root)) == ("MSMT17, MSMT17_V1" if version == "MSMT17_V1"
                                                     else "MSMT17, MSMT17_V2 (faces blurred)")


def test_cuhk03_mat_files_convert_to_the_source_pixels_and_the_new_protocol(layouts, source, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(layouts["CUHK03"], root)
    mat_path = root / "cuhk03" / "cuhk03_release" / "cuhk-03.mat"
    assert mat_path.read_bytes()[:10] == b"MATLAB 7.3"                  # MATLAB's header, then HDF5
    with h5py.File(mat_path, "r") as mat:
        assert mat["labeled"].shape == mat["detected"].shape == (1, 5)
        assert mat["testsets"].shape == (1, 20)
    config = scipy.io.loadmat(str(root / "cuhk03" / "cuhk03_new_protocol_config_labeled.mat"))
    assert config["train_idx"].dtype.kind == "i" and config["filelist"].shape[1] == 1

    labeled = DATASET_REGISTRY.get("CUHK03")(root=str(root))           # converts on first use
    detected = DATASET_REGISTRY.get("CUHK03Detected")(root=str(root))
    images = read_synthetic(source)
    by_pixels = {pixels(p).tobytes(): (pid, cam) for s in images.values() for p, pid, cam, _ in s}
    for _, pid, cam in labeled.query:                                   # views are cameras 0 and 1
        assert cam in (0, 1)
    for path, _, _ in labeled.train + labeled.query + labeled.gallery:
        assert "images_labeled" in path and pixels(path).tobytes() in by_pixels   # the source image, unchanged
    for path, _, _ in detected.query[:5]:
        assert "images_detected" in path and pixels(path).tobytes() not in by_pixels
    # one source identity per CUHK03 identity; training identities only in train, test ones in query/gallery
    train_source = {by_pixels[pixels(p).tobytes()][0] for p, _, _ in labeled.train}
    test_source = {by_pixels[pixels(p).tobytes()][0] for p, _, _ in labeled.query + labeled.gallery}
    assert train_source <= {pid for _, pid, _, _ in images["train"]} and not train_source & test_source
    assert len({pid for _, pid, _ in labeled.train}) == len(train_source)
    # the new protocol's queries: one image of each view per test identity
    assert Counter((pid, cam) for _, pid, cam in labeled.query) == Counter(
        {(pid, view): 1 for pid in {p for _, p, _ in labeled.query} for view in (0, 1)})
    assert describe_dataset("CUHK03", str(root)).startswith("CUHK03-NP, labeled boxes")
    assert describe_dataset("CUHK03Detected", str(root)).startswith("CUHK03-NP, detected boxes")


# ---- slips in a real folder: one line at start-up ----

def market_cfg(name="Market1501", combineall=False):
    cfg = load_config(promptsg.add_promptsg_config(get_cfg()), PROMPTSG_CFG,
                      [*TINY, "DATASETS.NAMES", f'("{name}",)', "DATASETS.TESTS", f'("{name}",)'])
    cfg.DATASETS.COMBINEALL = combineall
    return cfg


def copy_of(layouts, layout, tmp_path, name="root"):
    root = tmp_path / name
    shutil.copytree(layouts[layout], root)
    return root


def test_a_market_or_duke_file_with_another_name_or_camera_is_named(layouts, tmp_path):
    root = copy_of(layouts, "Market1501", tmp_path)
    query = root / "Market-1501-v15.09.15" / "query"
    first = sorted(query.glob("*.jpg"))[0]
    shutil.copy(first, query / "cover.jpg")
    with pytest.raises(InputError, match=r"Market1501: .*query/cover\.jpg: not a Market1501 image name"):
        check_datasets(market_cfg(), str(root), verify_images=False)
    (query / "cover.jpg").unlink()
    shutil.copy(first, query / "0001_c7s1_000000_00.jpg")
    with pytest.raises(InputError, match=r"0001_c7s1_000000_00\.jpg: camera 7 out of range 1-6"):
        check_datasets(market_cfg(), str(root), verify_images=False)
    (query / "0001_c7s1_000000_00.jpg").unlink()
    shutil.copy(first, query / "1502_c1s1_000000_00.jpg")
    with pytest.raises(InputError, match=r"1502_c1s1_000000_00\.jpg: identity 1502 out of range"):
        check_datasets(market_cfg(), str(root), verify_images=False)
    (query / "1502_c1s1_000000_00.jpg").unlink()
    check_datasets(market_cfg(), str(root), verify_images=False)
    duke = copy_of(layouts, "DukeMTMC", tmp_path, "duke")
    gallery = duke / "DukeMTMC-reID" / "bounding_box_test"
    shutil.copy(sorted(gallery.glob("*.jpg"))[0], gallery / "0005_c9_f0000001.jpg")
    with pytest.raises(InputError, match=r"0005_c9_f0000001\.jpg: camera 9 out of range 1-8"):
        check_datasets(market_cfg("DukeMTMC"), str(duke), verify_images=False)


def test_a_dataset_path_that_holds_an_identity_pattern_is_refused(layouts, tmp_path):
    """FastReID's Market reader searches the whole path: under /data/run_5_c1/ every image would be
    identity 5, camera 1."""
    root = copy_of(layouts, "Market1501", tmp_path, "run_5_c1")
    reader = DATASET_REGISTRY.get("Market1501")(root=str(root))
    assert {pid for _, pid, _ in reader.query} == {5}                      # what the reader would train on
    with pytest.raises(InputError, match=r"holds '5_c1', which FastReID's reader would take as every image's"):
        check_datasets(market_cfg(), str(root), verify_images=False)


def test_msmt17_slips_name_the_folder_file_and_line(layouts, tmp_path):
    with pytest.raises(InputError, match=r"neither MSMT17_V1/ nor MSMT17_V2/ in "):
        check_real_dataset("MSMT17", str(tmp_path))
    root = copy_of(layouts, "MSMT17_V2", tmp_path)
    lists = root / "MSMT17_V2"
    gallery = (lists / "list_gallery.txt").read_text().splitlines(keepends=True)
    (lists / "list_gallery.txt").write_text("".join(gallery[:3] + ["\n"] + gallery[3:]))
    with pytest.raises(InputError, match=r"list_gallery\.txt:4: a blank line"):
        check_datasets(market_cfg("MSMT17"), str(root), verify_images=False)
    (lists / "list_gallery.txt").write_text("".join(gallery[:1] + [gallery[1].replace(" ", "\t")] + gallery[2:]))
    with pytest.raises(InputError, match=r"list_gallery\.txt:2: expected 'FOLDER/NAME\.jpg PID' separated by one"):
        check_datasets(market_cfg("MSMT17"), str(root), verify_images=False)
    path, pid = gallery[0].split()
    bad = "_".join(path.split("_")[:2] + ["16"] + path.split("_")[3:])        # the camera field
    (lists / "list_gallery.txt").write_text("".join([f"{bad} {pid}\n"] + gallery[1:]))
    with pytest.raises(InputError, match=r"list_gallery\.txt:1: .*camera 16 out of range 1-15"):
        check_datasets(market_cfg("MSMT17"), str(root), verify_images=False)
    (lists / "list_gallery.txt").write_text("".join(gallery))
    # list_val.txt: needed only when DATASETS.COMBINEALL adds its images
    (lists / "list_val.txt").unlink()
    check_datasets(market_cfg("MSMT17"), str(root), verify_images=False)
    assert len(DATASET_REGISTRY.get("MSMT17")(root=str(root)).train) == len(
        (lists / "list_train.txt").read_text().splitlines())
    with pytest.raises(InputError, match=r"MSMT17_V2/list_val\.txt not found \(DATASETS\.COMBINEALL True adds"):
        check_datasets(market_cfg("MSMT17", combineall=True), str(root), verify_images=False)


def test_a_run_names_the_msmt17_version_and_cuhk03_boxes_in_its_log_and_results(layouts, tmp_path):
    """One epoch of a tiny model on each, through tools/train_net.py: the log and results.json say
    which variant was read."""
    for layout, name, expected in (("MSMT17_V1", "MSMT17", "MSMT17, MSMT17_V1"),
                                   ("CUHK03", "CUHK03Detected", "CUHK03-NP, detected boxes")):
        root = copy_of(layouts, layout, tmp_path, layout)
        out = tmp_path / f"run-{layout}"
        result = run(["--config-file", PROMPTSG_CFG, *TINY, "DATASETS.NAMES", f'("{name}",)',
                      "DATASETS.TESTS", f'("{name}",)', "MODEL.CLIP.NUM_CAMERAS", "15", "SOLVER.MAX_EPOCH", "1",
                      "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(out)], root)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Dataset {name}: {expected}" in (out / "log.txt").read_text()
        assert json.loads((out / "results.json").read_text())["datasets"][name].startswith(expected)


def test_a_folder_without_the_cuhk03_files_is_one_line(tmp_path, datasets_root):
    (tmp_path / "cuhk03" / "cuhk03_release").mkdir(parents=True)
    result = run(["--config-file", PROMPTSG_CFG, *TINY, "DATASETS.NAMES", '("CUHK03",)', "DATASETS.TESTS",
                  '("CUHK03",)'], tmp_path)
    one_line_error(result, "dataset CUHK03", "cuhk-03.mat")
