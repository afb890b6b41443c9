"""Tests of the SyntheticMarket generator, its FastReID dataset class and its difficulty."""
import hashlib
import logging
import os
import re
from pathlib import Path

import pytest
from PIL import Image

import promptsg  # noqa: F401  (patches FastReID, registers the dataset)
from fastreid.data.datasets import DATASET_REGISTRY
from promptsg.data import SyntheticMarket, generate_synthetic_market
from promptsg.data import synthetic

from tiny_runs import load_tool

synthetic_probe = load_tool("tools/synthetic_probe.py")

SMALL = dict(num_train_ids=12, num_test_ids=8, num_distractors=20, num_junk=4)
MARKET_RE = re.compile(r"([-\d]+)_c(\d)")   # the pattern of FastReID's Market1501.process_dir


def _files(dataset_dir, sub=""):
    root = Path(dataset_dir)
    return sorted(p for p in (root / sub).rglob("*") if p.is_file())


def _digest(dataset_dir, sub=""):
    h = hashlib.sha256()
    for p in _files(dataset_dir, sub):
        h.update(str(p.relative_to(dataset_dir)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _parse(split_dir):
    """[(pid, cam)] of every image, parsed with FastReID's Market regex."""
    out = []
    for p in sorted(Path(split_dir).glob("*.jpg")):
        pid, cam = map(int, MARKET_RE.search(p.name).groups())
        out.append((pid, cam))
    return out


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """The default-size dataset, built through the FastReID registry."""
    root = tmp_path_factory.mktemp("fastreid_datasets")
    return DATASET_REGISTRY.get("SyntheticMarket")(root=str(root))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate_synthetic_market(tmp_path / "a", seed=3, **SMALL)
    generate_synthetic_market(tmp_path / "b", seed=3, **SMALL)
    generate_synthetic_market(tmp_path / "c", seed=4, **SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a", "bounding_box_train") != _digest(tmp_path / "c", "bounding_box_train")


def test_layout_follows_market_protocol(tmp_path):
    d = tmp_path / "SyntheticMarket"
    manifest = generate_synthetic_market(d, **SMALL)
    train = _parse(d / "bounding_box_train")
    query = _parse(d / "query")
    gallery = _parse(d / "bounding_box_test")
    c = manifest["counts"]
    assert (len(train), len(query), len(gallery)) == (c["train_images"], c["query_images"], c["gallery_images"])

    train_pids = {p for p, _ in train}
    test_pids = {p for p, _ in query}
    assert train_pids == set(range(1, 13)) and len(test_pids) == 8
    assert not train_pids & test_pids
    assert {p for p, _ in gallery} == test_pids | {0, -1}
    assert sum(p == 0 for p, _ in gallery) == 20 and sum(p == -1 for p, _ in gallery) == 4
    assert all(1 <= cam <= 6 for _, cam in train + query + gallery)
    # Every query has a match from another camera; query cameras of one identity are distinct.
    for pid, cam in query:
        assert any(p == pid and c != cam for p, c in gallery)
    assert len(set(query)) == len(query)
    # Every training identity is seen by at least two cameras.
    for pid in train_pids:
        assert len({c for p, c in train if p == pid}) >= 2

    with Image.open(next((d / "query").glob("*.jpg"))) as img:
        assert img.size == (64, 128) and img.mode == "RGB"
    assert manifest == synthetic._read_manifest(str(d))
    assert manifest["params"]["seed"] == 0 and manifest["version"] == synthetic.GENERATOR_VERSION


def test_a_folder_is_generated_only_when_missing_and_user_changes_are_kept(tmp_path, caplog):
    d = tmp_path / "SyntheticMarket"
    first = generate_synthetic_market(d, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in _files(d)}
    assert generate_synthetic_market(d, **SMALL) == first                # reused, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in _files(d)} == stamps

    # A user adds one query and removes one gallery image: used as it is, one warning, nothing restored.
    query = sorted((d / "query").glob("*.jpg"))
    added = d / "query" / "0999_c2s1_000001_01.jpg"
    added.write_bytes(query[0].read_bytes())
    removed = sorted((d / "bounding_box_test").glob("*.jpg"))[0]
    removed.unlink()
    with caplog.at_level(logging.WARNING, logger="promptsg.data.synthetic"):
        assert generate_synthetic_market(d, **SMALL) == first
        generate_synthetic_market(d, **SMALL)                            # the same process: said once
    warnings = [r.getMessage() for r in caplog.records if "differs" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{len(query) + 1} images in query/ where the generator wrote {len(query)}" in warnings[0]
    assert "bounding_box_test/" in warnings[0] and "--regenerate" in warnings[0]
    assert added.is_file() and not removed.exists()
    assert str(added) in [path for path, _, _ in SyntheticMarket(root=str(tmp_path), **SMALL).query]

    # Other parameters: refused, naming the change and the command; the folder is left as it is.
    before = {p: p.stat().st_mtime_ns for p in _files(d)}
    with pytest.raises(RuntimeError, match=r"num_distractors 20 -> 5\); remove it to generate it with these"):
        generate_synthetic_market(d, **dict(SMALL, num_distractors=5))
    assert {p: p.stat().st_mtime_ns for p in _files(d)} == before

    # The explicit command rewrites it with the manifest's own parameters: the generator's files only.
    synthetic.regenerate_dataset(d)
    assert not added.exists() and removed.is_file()
    assert sorted(os.listdir(tmp_path)) == ["SyntheticMarket"]           # no temporary leftovers
    fresh = tmp_path / "fresh"
    generate_synthetic_market(fresh, **SMALL)
    assert _digest(d) == _digest(fresh)


def test_a_folder_of_another_generator_version_is_refused_until_regenerated(tmp_path, monkeypatch):
    d = tmp_path / "SyntheticMarket"
    generate_synthetic_market(d, **SMALL)
    digest = _digest(d)
    newer = synthetic._MARKET._replace(stamps={"version": synthetic.GENERATOR_VERSION + 1})
    for part in (synthetic.market, synthetic.registration):   # the parts that write a market folder
        monkeypatch.setattr(part, "_MARKET", newer)
    with pytest.raises(RuntimeError, match=rf"version {synthetic.GENERATOR_VERSION} \(this code writes "
                                           rf"{synthetic.GENERATOR_VERSION + 1}\); regenerate it with"):
        generate_synthetic_market(d, **SMALL)
    assert _digest(d) == digest
    synthetic.regenerate_dataset(d)
    assert synthetic._read_manifest(str(d))["version"] == synthetic.GENERATOR_VERSION + 1


def test_regenerate_command_rewrites_only_generated_folders(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "SyntheticMarket"
    generate_synthetic_market(d, **SMALL)
    (d / "query" / "0999_c2s1_000001_01.jpg").write_bytes(b"not an image")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    done = subprocess.run([sys.executable, "-m", "promptsg.data", "--regenerate", str(d)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "regenerated" in done.stdout, done.stderr
    assert not (d / "query" / "0999_c2s1_000001_01.jpg").exists()
    refused = subprocess.run([sys.executable, "-m", "promptsg.data", "--regenerate", str(foreign)],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and str(foreign) in refused.stderr.strip().splitlines()[-1]
    assert (foreign / "keep.txt").read_text() == "keep"


def test_foreign_directory_is_never_touched(tmp_path):
    d = tmp_path / "SyntheticMarket"
    d.mkdir()
    (d / "mine.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="not created by"):
        generate_synthetic_market(d, **SMALL)
    assert (d / "mine.txt").read_text() == "keep"


def test_a_folder_another_process_installs_meanwhile_is_used_only_if_it_is_the_same(tmp_path, monkeypatch):
    """Two processes generate one folder at once: the one that renames its copy second finds the
    other's in place, and takes it only when it holds what its own parameters give."""
    folders = synthetic.folders
    for other, accepted in ((dict(SMALL), True), (dict(SMALL, num_distractors=5), False)):
        d, theirs = tmp_path / f"SyntheticMarket-{accepted}", tmp_path / f"theirs-{accepted}"
        generate_synthetic_market(theirs, **other)
        real_rename = os.rename

        def rename_after_the_other(src, dst):
            if os.path.basename(dst) == d.name and ".tmp-" in os.path.basename(src):
                real_rename(theirs, dst)                        # the other process got there first
                raise OSError(39, "Directory not empty", str(dst))
            return real_rename(src, dst)

        monkeypatch.setattr(folders.os, "rename", rename_after_the_other)
        if accepted:
            manifest = generate_synthetic_market(d, **SMALL)
            assert manifest["params"]["num_distractors"] == SMALL["num_distractors"] and not theirs.exists()
        else:
            with pytest.raises(RuntimeError, match=f"{d} was written by another process meanwhile, with other "):
                generate_synthetic_market(d, **SMALL)
        monkeypatch.undo()
        assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]      # its own copy removed either way


def test_interrupted_generation_leaves_nothing_usable(tmp_path, monkeypatch):
    d = tmp_path / "SyntheticMarket"
    real_save = synthetic._save_jpeg
    calls = []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) > 10:
            raise KeyboardInterrupt("simulated interruption")
        real_save(image, path)

    monkeypatch.setattr(synthetic.market, "_save_jpeg", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_market(d, **SMALL)
    assert os.listdir(tmp_path) == []   # neither the dataset nor its temporary directory

    # An interrupted regeneration keeps the previous complete dataset as it was.
    monkeypatch.setattr(synthetic.market, "_save_jpeg", real_save)
    generate_synthetic_market(d, **SMALL)
    digest = _digest(d)
    calls.clear()
    monkeypatch.setattr(synthetic.market, "_save_jpeg", failing_save)
    with pytest.raises(KeyboardInterrupt):
        synthetic.regenerate_dataset(d)
    assert sorted(os.listdir(tmp_path)) == ["SyntheticMarket"] and _digest(d) == digest

    # A leftover of a killed run (a hidden temporary sibling) is never picked up.
    monkeypatch.setattr(synthetic.market, "_save_jpeg", real_save)
    leftover = tmp_path / ".Other.tmp-killed"
    (leftover / "query").mkdir(parents=True)
    generate_synthetic_market(tmp_path / "Other", **SMALL)
    assert _digest(tmp_path / "Other") == digest


def test_fastreid_dataset_class(tmp_path, caplog):
    assert DATASET_REGISTRY.get("SyntheticMarket") is SyntheticMarket
    ds = DATASET_REGISTRY.get("SyntheticMarket")(root=str(tmp_path), **SMALL)
    c = ds.manifest["counts"]
    assert ds.dataset_dir == str(tmp_path / "SyntheticMarket")
    assert len(ds.train) == c["train_images"]
    assert len(ds.query) == c["query_images"]
    assert len(ds.gallery) == c["gallery_images"] - c["junk_images"]   # junk skipped
    assert ds.num_train_pids == 12 and ds.num_train_cams <= 6
    assert len(ds) == len(ds.train)

    path, pid, camid = ds.train[0]
    assert os.path.isfile(path) and pid.startswith("synthetic_") and camid.startswith("synthetic_")
    for path, pid, camid in ds.query + ds.gallery:
        assert isinstance(pid, int) and pid >= 0 and 0 <= camid < 6
        assert MARKET_RE.search(os.path.basename(path)).group(1) == f"{pid:04d}"
    assert {pid for _, pid, _ in ds.gallery} >= {pid for _, pid, _ in ds.query} | {0}
    with caplog.at_level(logging.INFO, logger="fastreid.data.datasets.bases"):
        ds.show_train()
        ds.show_test()
    # FastReID's summary tables: subset, identities, images, cameras.
    num_cams = len({c for _, _, c in ds.train})
    assert re.search(rf"\|\s*train\s*\|\s*12\s*\|\s*{len(ds.train)}\s*\|\s*{num_cams}\s*\|", caplog.text)
    assert re.search(rf"\|\s*query\s*\|\s*8\s*\|\s*{len(ds.query)}\s*\|", caplog.text)
    assert re.search(rf"\|\s*gallery\s*\|\s*9\s*\|\s*{len(ds.gallery)}\s*\|", caplog.text)  # + distractors


def test_colour_histogram_probe_is_above_chance_but_far_from_solved(default_dataset):
    ds = default_dataset
    assert ds.num_train_pids == synthetic.DEFAULT_NUM_TRAIN_IDS
    result = synthetic_probe.probe(ds.dataset_dir)
    assert result["num_queries"] == len(ds.query)
    assert result["chance_mAP"] < 0.02
    assert 2 * result["chance_mAP"] < result["mAP"] < 0.6
