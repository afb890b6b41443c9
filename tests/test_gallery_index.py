"""The gallery index (promptsg/gallery_index.py, tools/gallery_index.py): its exact search ranks as
tools/extract_features.py and ``Run.search`` do, it survives a save and load, ``add`` equals a
build over the union, another model's index is refused, and the approximate faiss indexes meet
their invariants on random features (IVF probing every list and HNSW with a beam as wide as the
gallery are exact search; PQ ranks by its reconstructed features)."""
import json
import os
import subprocess
import sys
import zipfile

import faiss
import numpy as np
import pytest
import torch
from fastreid.utils.compute_dist import compute_cosine_distance, compute_euclidean_distance

import promptsg
from promptsg.engine.preflight import InputError
from promptsg.gallery_index import FeatureIndex, fingerprint

from tiny_runs import PROMPTSG_CFG, ROOT, TINY, load_extract_tool, load_tool, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets_root):
    """A one-epoch tiny PromptSG run."""
    out = tmp_path_factory.mktemp("run")
    result = run(["--config-file", PROMPTSG_CFG, *TINY, "SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1",
                  "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(out)], datasets_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def model(trained):
    return promptsg.load(str(trained))


def folders(datasets_root):
    split = datasets_root / "SyntheticMarketTiny"
    return split / "query", split / "bounding_box_test"


def assert_same_ranking(hits, expected):
    """Same queries, the same images at the same distances to float rounding, each list in order
    of distance: the same ranking up to images whose distances tie within that rounding (the index
    embeds the gallery in other batches than a query-gallery pass; rounding differences stay below
    1e-6, and two gallery images of the tiny split can lie closer than that to a query)."""
    assert [str(h["query"]) for h in hits] == [str(e["query"]) for e in expected]
    for h, e in zip(hits, expected):
        got = {t["image"]: t["distance"] for t in h["top"]}
        want = {os.path.abspath(t["image"]): t["distance"] for t in e["top"]}
        assert len(got) == len(h["top"]) and sorted(got) == sorted(want)
        np.testing.assert_allclose([got[i] for i in sorted(got)], [want[i] for i in sorted(got)], rtol=0, atol=1e-5)
        for hits_list in (h["top"], e["top"]):
            distances = [t["distance"] for t in hits_list]
            assert all(a <= b + 1e-6 for a, b in zip(distances, distances[1:])), distances
        # Where the two orders differ, the images swapped lie at the same distance.
        for a, b in zip(h["top"], e["top"]):
            if a["image"] != os.path.abspath(b["image"]):
                assert abs(got[a["image"]] - got[os.path.abspath(b["image"])]) <= 1e-5, (a, b)


def test_exact_index_ranks_as_run_search(model, datasets_root):
    query, gallery = folders(datasets_root)
    index = model.build_index(str(gallery))
    assert len(index) == len(os.listdir(gallery))
    assert_same_ranking(index.search(str(query), k=len(index)), model.search(str(query), str(gallery), top_k=len(index)))
    # features in, the same neighbours out; the query is then the row
    by_features = index.search(model.embed(str(query)), k=5)
    assert [h["query"] for h in by_features] == list(range(len(by_features)))
    for h, e in zip(by_features, index.search(str(query), k=5)):
        assert [t["image"] for t in h["top"]] == [t["image"] for t in e["top"]]


def test_tool_ranks_as_extract_features(trained, datasets_root, tmp_path):
    query, gallery = folders(datasets_root)
    tool, index_file = load_tool("tools/gallery_index.py"), str(tmp_path / "gallery_index.npz")
    tool.main(["build", "--config-file", str(trained), "--images", str(gallery), "--index", index_file])
    # the same model given as a config file and its weights: the same fingerprint, the index loads
    tool.main(["search", "--config-file", PROMPTSG_CFG, "--index", index_file, "--query", str(query),
               "--output", str(tmp_path / "index"), "--top-k", "7", *TINY,
               "MODEL.WEIGHTS", str(trained / "model_final.pth")])
    load_extract_tool().main(["--config-file", PROMPTSG_CFG, "--query", str(query), "--images", str(gallery),
                              "--output", str(tmp_path / "dense"), "--top-k", "7", *TINY,
                              "MODEL.WEIGHTS", str(trained / "model_final.pth")])
    assert_same_ranking(json.loads((tmp_path / "index" / "ranking.json").read_text()),
                        json.loads((tmp_path / "dense" / "ranking.json").read_text()))


def test_saved_index_loads_and_searches_as_built(model, trained, datasets_root, tmp_path):
    query, gallery = folders(datasets_root)
    built = model.build_index(str(gallery))
    built.save(tmp_path / "gallery_index.npz")
    loaded = promptsg.load(str(trained)).load_index(tmp_path / "gallery_index.npz")
    assert loaded.images == built.images and loaded.fingerprint == built.fingerprint
    assert loaded.search(str(query), k=10) == built.search(str(query), k=10)


def test_add_then_search_equals_a_build_over_the_union(model, datasets_root, tmp_path):
    query, gallery = folders(datasets_root)
    images = sorted(str(p) for p in gallery.iterdir())
    union = model.build_index(images)
    index = model.build_index(images[:30])
    index.save(tmp_path / "gallery_index.npz")
    index = model.load_index(tmp_path / "gallery_index.npz")
    added, skipped = index.add(images[25:])                  # five images already in the index
    assert added == [os.path.abspath(p) for p in images[30:]]
    assert skipped == [os.path.abspath(p) for p in images[25:30]]
    assert index.images == union.images and len(index.features) == len(union)
    index.save(tmp_path / "gallery_index.npz")                # the image list stays in step on disk
    for grown in (index, model.load_index(tmp_path / "gallery_index.npz")):
        assert_same_ranking(grown.search(str(query), k=len(images)), union.search(str(query), k=len(images)))
    assert index.add(str(gallery)) == ([], union.images)      # everything known: nothing embedded


def test_another_model_s_index_is_refused_in_one_line(trained, model, datasets_root, tmp_path):
    _, gallery = folders(datasets_root)
    path = tmp_path / "gallery_index.npz"
    model.build_index(str(gallery)).save(path)
    built_by = model.load_index(path).fingerprint.digest[:16]
    other_weights = promptsg.load(str(trained))
    with torch.no_grad():
        next(other_weights.model.parameters()).add_(1e-3)
    other_prompt = promptsg.load(str(trained), opts=["MODEL.PROMPTSG.INFERENCE_PROMPT", "composed"])
    for other, differs in ((other_weights, "the weights"), (other_prompt, "MODEL.PROMPTSG.INFERENCE_PROMPT")):
        with pytest.raises(InputError) as refused:
            other.load_index(path)
        message = str(refused.value)
        assert "\n" not in message and str(path) in message and differs in message
        assert built_by in message and fingerprint(other.cfg, other.model).digest[:16] in message


def test_missing_and_corrupt_index_files_are_named_in_one_line(model, datasets_root, tmp_path):
    _, gallery = folders(datasets_root)
    good = tmp_path / "good.npz"
    model.build_index(str(gallery)).save(good)
    truncated, garbage, no_meta, bad_faiss = (tmp_path / f"{n}.npz" for n in ("truncated", "garbage", "no_meta", "bad"))
    truncated.write_bytes(good.read_bytes()[:-200])
    garbage.write_bytes(os.urandom(4096))
    with zipfile.ZipFile(good) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    for path, drop, replace in ((no_meta, "meta.npy", None), (bad_faiss, None, "index.npy")):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                if name != drop:
                    archive.writestr(name, data if name != replace else data[:128] + b"\x00" * (len(data) - 128))
    for path, says in ((tmp_path / "missing.npz", "not found"), (truncated, "not a readable gallery index"),
                       (garbage, "not a readable gallery index"), (no_meta, "not a readable gallery index"),
                       (bad_faiss, "faiss index is corrupt")):
        with pytest.raises(InputError) as refused:
            model.load_index(path)
        assert str(path) in str(refused.value) and says in str(refused.value) and "\n" not in str(refused.value)


# ---- nothing lost, nothing doubled ----

def test_two_adds_at_once_lose_no_image(model, datasets_root, tmp_path, monkeypatch):
    """Each add loads the index, embeds and saves: without the file's lock, two at once both load the
    same index and the later save drops the other's images. The load is slowed so that both adds
    overlap every time."""
    import threading
    import time

    from promptsg.gallery_index import GalleryIndex, add_to_file

    _, gallery = folders(datasets_root)
    images = sorted(str(p) for p in gallery.iterdir())
    path = tmp_path / "gallery_index.npz"
    model.build_index(images[:10]).save(path)
    load = GalleryIndex.load.__func__

    def slow_load(cls, *args, **kwargs):
        index = load(cls, *args, **kwargs)
        time.sleep(1.0)
        return index

    monkeypatch.setattr(GalleryIndex, "load", classmethod(slow_load))
    halves = (images[10:40], images[40:])
    threads = [threading.Thread(target=add_to_file, args=(model, str(path), half)) for half in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert sorted(model.load_index(path).images) == sorted(map(os.path.abspath, images))


def test_build_onto_an_index_needs_overwrite(trained, datasets_root, tmp_path):
    query, gallery = folders(datasets_root)
    path = tmp_path / "gallery_index.npz"
    args = ["build", "--config-file", str(trained), "--index", str(path)]
    run_tool = [os.path.join(ROOT, "tools", "gallery_index.py")]
    load_tool("tools/gallery_index.py").main([*args, "--images", str(query)])
    before = path.read_bytes()
    result = subprocess.run([sys.executable, *run_tool, *args, "--images", str(gallery)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
        f"error: {path} already exists: add images to it with `add`, or replace it with --overwrite")
    assert path.read_bytes() == before
    load_tool("tools/gallery_index.py").main([*args, "--images", str(gallery), "--overwrite"])
    assert promptsg.load(str(trained)).load_index(path).images == sorted(
        os.path.abspath(p) for p in map(str, gallery.iterdir()))


def test_an_image_reached_twice_is_added_once(model, datasets_root, tmp_path):
    """Through a symbolic link to its folder, or as a file inside a folder also given."""
    _, gallery = folders(datasets_root)
    images = sorted(str(p) for p in gallery.iterdir())
    index = model.build_index(images[:10])
    link = tmp_path / "linked_gallery"
    link.symlink_to(gallery, target_is_directory=True)
    added, skipped = index.add(str(link))
    assert len(added) == len(images) - 10 and len(skipped) == 10
    assert index.add(str(link)) == ([], sorted(str(p) for p in map(os.path.abspath, link.iterdir())))
    again = model.build_index(images[:10])
    added, skipped = again.add([str(gallery), images[20]])      # the file is also in the folder
    assert len(added) == len(images) - 10 and len(again) == len(images) == len(again.features)
    fresh = model.build_index([str(gallery), images[3]])
    assert fresh.images == [os.path.abspath(p) for p in images] and len(fresh.features) == len(images)
    assert len(model.build_index([str(gallery), str(link)])) == len(images)


def test_the_fingerprint_holds_the_sie_camera(model):
    assert fingerprint(model.cfg, model.model, camera=0).digest != fingerprint(model.cfg, model.model, camera=1).digest
    assert fingerprint(model.cfg, model.model, camera=1) == fingerprint(model.cfg, model.model, camera=1)


def test_adding_in_chunks_keeps_every_chunk():
    whole, chunked = FeatureIndex.create(GALLERY.shape[1]), FeatureIndex.create(GALLERY.shape[1])
    whole.add(GALLERY)
    chunked.add(GALLERY, chunk=700)                          # 5 chunks, the last one partial
    assert len(chunked) == len(GALLERY)
    for (d1, r1), (d2, r2) in ((whole.search(QUERIES, 10), chunked.search(QUERIES, 10)),):
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-6)


# ---- the faiss indexes on random features (no model) ----

def random_features(n, dim=32, seed=0):
    """Unit-norm rows around 40 centres, as a gallery's features cluster by identity."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    x = (centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_neighbours(query, gallery, k):
    """(rows, distances) of the k nearest by 1 - cosine, written out."""
    dist = 1 - query @ gallery.T
    rows = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(dist, rows, axis=1)


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


GALLERY, QUERIES = random_features(3000), random_features(200, seed=1)


def built(factory, params="", metric="cosine"):
    index = FeatureIndex.create(GALLERY.shape[1], metric, factory, params)
    index.add(GALLERY)
    return index


@pytest.mark.parametrize("metric, fastreid", [("cosine", compute_cosine_distance),
                                              ("euclidean", compute_euclidean_distance)])
def test_flat_index_gives_fastreid_s_distances(metric, fastreid):
    gallery = GALLERY * np.linspace(0.5, 2, len(GALLERY), dtype=np.float32)[:, None]    # not unit-norm
    index = FeatureIndex.create(gallery.shape[1], metric)
    index.add(gallery)
    distances, rows = index.search(QUERIES, 10)
    dense = fastreid(torch.from_numpy(QUERIES), torch.from_numpy(gallery))
    np.testing.assert_array_equal(rows, np.argsort(dense, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(distances, np.take_along_axis(dense, rows, axis=1), rtol=0, atol=1e-5)


def test_ivf_recall_grows_with_nprobe_to_exact_search():
    truth, true_distances = exact_neighbours(QUERIES, GALLERY, 10)
    index = built("IVF64,Flat")
    recalls = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        index.set_params(f"nprobe={nprobe}")
        distances, rows = index.search(QUERIES, 10)
        recalls.append(recall(rows, truth))
    assert recalls == sorted(recalls) and recalls[0] < 1       # more lists probed never loses a neighbour
    np.testing.assert_array_equal(rows, truth)                 # every list probed: exact search
    np.testing.assert_allclose(distances, true_distances, rtol=0, atol=1e-5)


def test_hnsw_with_a_beam_as_wide_as_the_gallery_is_exact_search():
    truth, true_distances = exact_neighbours(QUERIES, GALLERY, 10)
    index = built("HNSW16", "efSearch=16")
    distances, rows = index.search(QUERIES, 10)                # approximate neighbours, their true distances
    np.testing.assert_allclose(distances, np.take_along_axis(1 - QUERIES @ GALLERY.T, rows, axis=1), rtol=0, atol=1e-5)
    index.set_params(f"efSearch={len(GALLERY)}")
    distances, rows = index.search(QUERIES, 10)
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(distances, true_distances, rtol=0, atol=1e-5)


@pytest.mark.parametrize("factory, params", [("IVF64,PQ8x6np", "nprobe=64"), ("PQ8x6np", "")])
def test_pq_ranks_by_its_reconstructed_features(factory, params):
    """Every list probed, IVF-PQ (and PQ) is exact search over the features its codes decode to."""
    index = built(factory, params)
    if isinstance(index.index, faiss.IndexIVF):
        index.index.make_direct_map()
    decoded = index.index.reconstruct_n(0, len(GALLERY))
    distances, rows = index.search(QUERIES, 10)
    np.testing.assert_allclose(distances, exact_neighbours(QUERIES, decoded, 10)[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(distances, np.take_along_axis(1 - QUERIES @ decoded.T, rows, axis=1), rtol=0, atol=1e-5)


def test_bad_index_settings_are_one_line_errors():
    for factory, params, says in (("IVF64,Bogus", "", "could not parse"), ("HNSW16", "nprobe=4", "nprobe"),
                                  ("PQ7", "", "PQ7")):
        with pytest.raises(InputError, match=says) as refused:
            built(factory, params)
        assert "\n" not in str(refused.value)
    index = FeatureIndex.create(GALLERY.shape[1], "cosine", "IVF4096,Flat")
    with pytest.raises(InputError, match="cannot be trained on 3000 features"):
        index.add(GALLERY)
    with pytest.raises(InputError, match="TEST.METRIC jaccard"):
        FeatureIndex.create(32, "jaccard")
