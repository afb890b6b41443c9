"""A synthetic split's people written in the real datasets' layouts, for FastReID's own readers.

``write_real_layout(layout, source, root)`` copies the identities of a SyntheticMarket folder
(``source``: ``bounding_box_train``, ``query``, ``bounding_box_test``) under the datasets root
``root`` in the folder, file names and list or ``.mat`` files of a real dataset, so that
``DATASET_REGISTRY.get(name)(root=root)`` reads them as it reads the real one:

=============  ========================================================================================
layout         what is written under ``root``
=============  ========================================================================================
Market1501     ``Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/PPPP_cCs1_FFFFFF_00.jpg``
               (distractors pid 0000, junk pid -1 kept)
DukeMTMC       ``DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}/PPPP_cC_fFFFFFFF.jpg``
MSMT17_V1      ``MSMT17_V1/{train,test}/PPPP/PPPP_NNN_CC_0303morning_FFFF_0.jpg`` and ``list_train.txt``,
               ``list_val.txt`` (every 5th training image, as MSMT17's val list also lists training
               images), ``list_query.txt``, ``list_gallery.txt``: lines ``PPPP/name.jpg PID``, test
               identities numbered from 0
MSMT17_V2      the same in ``MSMT17_V2/{mask_train_v2,mask_test_v2}``
CUHK03         ``cuhk03/cuhk03_release/cuhk-03.mat`` (MATLAB v7.3, an HDF5 file: ``detected`` and
               ``labeled`` cells of camera pairs, each a persons x 10 cell of image references, views
               1 and 2 in columns 1-5 and 6-10, unused cells empty; ``testsets``: 20 lists of
               [camera pair, person] rows) and ``cuhk03/cuhk03_new_protocol_config_{detected,labeled}.mat``
               (MATLAB v5: ``train_idx``, ``query_idx``, ``gallery_idx``, 1-based, ``labels``,
               ``filelist``, ``camId``); FastReID converts them to PNG folders and split JSONs on first use
=============  ========================================================================================

Cameras: Market keeps the synthetic camera (1-6), Duke and MSMT17 too (1-based in the names);
CUHK03 has two views per camera pair, the synthetic cameras' parity (odd: view 1, even: view 2).
CUHK03's new protocol puts the training identities in ``train_idx``; a test identity's first image
of each view is a query and the rest are its gallery. Its detected boxes are the labeled ones
shifted by one pixel, so the two variants differ in their pixels, as the real ones do.
"""
import glob
import os
import re
from collections import defaultdict

import h5py
import numpy as np
import scipy.io
from PIL import Image

LAYOUTS = ("Market1501", "DukeMTMC", "MSMT17_V1", "MSMT17_V2", "CUHK03")
_NAME = re.compile(r"^(-?\d+)_c(\d)s\d_(\d+)_\d+\.jpg$")
_MSMT_DIRS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
CUHK03_PAIRS = 5           # camera pairs in cuhk-03.mat
CUHK03_VIEW_SLOTS = 5      # images per view in a person's row (columns 1-5: view 1, 6-10: view 2)


def read_synthetic(source):
    """The images of a SyntheticMarket folder: {split: [(path, pid, camera, frame)]}, sorted by name;
    split is train, query or gallery."""
    images = {}
    for split, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        rows = []
        for path in sorted(glob.glob(os.path.join(source, folder, "*.jpg"))):
            match = _NAME.match(os.path.basename(path))
            if match is None:
                raise ValueError(f"{path}: not a SyntheticMarket file name")
            pid, camera, frame = map(int, match.groups())
            rows.append((path, pid, camera, frame))
        images[split] = rows
    return images


def _copy(path, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(path, "rb") as f, open(target, "wb") as g:
        g.write(f.read())


def write_real_layout(layout, source, root):
    """Write the synthetic split ``source`` under ``root`` in ``layout`` (one of LAYOUTS); returns
    the folder written."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    images = read_synthetic(source)
    if layout == "Market1501":
        return _write_market(images, os.path.join(root, "Market-1501-v15.09.15"))
    if layout == "DukeMTMC":
        return _write_duke(images, os.path.join(root, "DukeMTMC-reID"))
    if layout in _MSMT_DIRS:
        return _write_msmt(images, os.path.join(root, layout), *_MSMT_DIRS[layout])
    return _write_cuhk03(images, os.path.join(root, "cuhk03"))


_SPLIT_DIRS = (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test"))


def _write_market(images, out):
    for split, folder in _SPLIT_DIRS:
        for path, pid, camera, frame in images[split]:
            _copy(path, os.path.join(out, folder, f"{pid:04d}_c{camera}s1_{frame:06d}_00.jpg"
                                     if pid >= 0 else f"-1_c{camera}s1_{frame:06d}_00.jpg"))
    return out


def _write_duke(images, out):
    for split, folder in _SPLIT_DIRS:
        for path, pid, camera, frame in images[split]:
            if pid > 0:                        # DukeMTMC-reID has no junk or pid-0 images
                _copy(path, os.path.join(out, folder, f"{pid:04d}_c{camera}_f{frame:07d}.jpg"))
    return out


def _write_msmt(images, out, train_dir, test_dir):
    train_ids = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _, _ in images["train"]}))}
    test_ids = {pid: i for i, pid in enumerate(sorted({pid for s in ("query", "gallery")
                                                      for _, pid, _, _ in images[s] if pid > 0}))}
    lists = defaultdict(list)
    for split, folder, ids in (("train", train_dir, train_ids), ("query", test_dir, test_ids),
                               ("gallery", test_dir, test_ids)):
        counts = defaultdict(int)
        for path, pid, camera, frame in images[split]:
            if pid <= 0:
                continue
            label = ids[pid]
            name = f"{label:04d}/{label:04d}_{counts[label]:03d}_{camera:02d}_0303morning_{frame:04d}_0.jpg"
            counts[label] += 1
            _copy(path, os.path.join(out, folder, name))
            lists[split].append(f"{name} {label}\n")
    lists["val"] = lists["train"][::5]
    for split in ("train", "val", "query", "gallery"):
        with open(os.path.join(out, f"list_{split}.txt"), "w") as f:
            f.writelines(lists[split])
    return out


# ---- CUHK03: MATLAB files ----

def cuhk03_persons(images):
    """The synthetic identities as CUHK03 persons: [(pair, person, is_train, [view 1 paths], [view 2
    paths])], identities dealt over the camera pairs in turn, numbered from 1 within a pair, each
    view holding at most CUHK03_VIEW_SLOTS images; identities seen in one view only are left out."""
    by_pid = defaultdict(lambda: ([], []))
    train_pids = {pid for _, pid, _, _ in images["train"]}
    for split in ("train", "query", "gallery"):
        for path, pid, camera, _ in images[split]:
            if pid > 0:
                by_pid[pid][(camera + 1) % 2].append(path)       # odd cameras: view 1, even: view 2
    persons, counts = [], defaultdict(int)
    for i, pid in enumerate(p for p in sorted(by_pid) if all(by_pid[p])):
        pair = i % CUHK03_PAIRS + 1
        counts[pair] += 1
        views = [sorted(v)[:CUHK03_VIEW_SLOTS] for v in by_pid[pid]]
        persons.append((pair, counts[pair], pid in train_pids, *views))
    return persons


def cuhk03_file_name(pair, person, view, slot):
    """The name FastReID gives an image it extracts from cuhk-03.mat (slot 0-9 over both views)."""
    return f"{pair:01d}_{person:03d}_{view:01d}_{slot + 1:02d}.png"


def _pixels(path, shift):
    image = np.asarray(Image.open(path).convert("RGB"))
    return np.roll(image, shift, axis=1) if shift else image


def _write_cuhk03(images, out):
    persons = cuhk03_persons(images)
    release = os.path.join(out, "cuhk03_release")
    os.makedirs(release, exist_ok=True)
    with h5py.File(os.path.join(release, "cuhk-03.mat"), "w", userblock_size=512) as mat:
        refs = mat.create_group("#refs#")
        counter = iter(range(10 ** 9))

        def stored(array):
            name = f"r{next(counter)}"
            refs.create_dataset(name, data=array)
            return refs[name].ref

        empty = np.zeros(2, dtype=np.uint64)                  # how MATLAB v7.3 stores an empty matrix
        for variant, shift in (("labeled", 0), ("detected", 1)):
            pair_refs = []
            for pair in range(1, CUHK03_PAIRS + 1):
                rows = [p for p in persons if p[0] == pair]
                cells = np.empty((2 * CUHK03_VIEW_SLOTS, len(rows)), dtype=h5py.ref_dtype)
                for column, (_, _, _, view1, view2) in enumerate(rows):
                    for view, paths in enumerate((view1, view2)):
                        for slot in range(CUHK03_VIEW_SLOTS):
                            array = (_pixels(paths[slot], shift).T if slot < len(paths) else empty)
                            cells[view * CUHK03_VIEW_SLOTS + slot, column] = stored(array)
                pair_refs.append(stored(cells))
            mat.create_dataset(variant, data=np.array([pair_refs], dtype=h5py.ref_dtype))
        test = np.array([[p[0], p[1]] for p in persons if not p[2]], dtype=np.float64)
        mat.create_dataset("testsets", data=np.array([[stored(test.T)] * 20], dtype=h5py.ref_dtype))
    with open(os.path.join(release, "cuhk-03.mat"), "r+b") as f:     # MATLAB's text header, in the user block
        f.write(b"MATLAB 7.3 MAT-file, written by promptsg.data.synthetic.real_layouts".ljust(116))
    for variant in ("detected", "labeled"):
        scipy.io.savemat(os.path.join(out, f"cuhk03_new_protocol_config_{variant}.mat"), _new_protocol(persons))
    return out


def _new_protocol(persons):
    """The new protocol's config: every extracted image listed once, 1-based indices into that list."""
    filelist, labels, cameras, train, query, gallery = [], [], [], [], [], []
    label = {(p[0], p[1]): i + 1 for i, p in enumerate(persons)}
    for pair, person, is_train, view1, view2 in persons:
        for view, paths in ((1, view1), (2, view2)):
            for slot in range(len(paths)):
                filelist.append(cuhk03_file_name(pair, person, view, slot + (view - 1) * CUHK03_VIEW_SLOTS))
                labels.append(label[(pair, person)])
                cameras.append(view)
                index = len(filelist)
                (train if is_train else query if slot == 0 else gallery).append(index)
    column = lambda values: np.array(values, dtype=np.int32).reshape(-1, 1)     # integers, as in the real files
    names = np.empty((len(filelist), 1), dtype=object)
    names[:, 0] = filelist
    return {"filelist": names, "labels": column(labels), "camId": column(cameras),
            "train_idx": column(train), "query_idx": column(query), "gallery_idx": column(gallery)}
