"""The paper's four datasets as FastReID's readers take them: layouts checked before training, and
the variant a run uses named in its log and ``results.json``.

FastReID's readers fail on a slip in a real folder with a bare ``assert``, an ``AttributeError``
or a ``ValueError`` that names no file, or read it wrong without a word. ``check_real_dataset``
runs before the reader (``engine.preflight.check_datasets``) and says in one line what is wrong:

* Market-1501, DukeMTMC-reID: a ``.jpg`` whose name is not ``PID_cCAM...`` (``cover.jpg``), an
  identity or camera out of the dataset's range, and a dataset path that itself holds ``N_cM``
  (the readers search the whole path, so every image would take that identity and camera);
* MSMT17: neither ``MSMT17_V1/`` nor ``MSMT17_V2/``, a missing list file, a blank or malformed
  list line (file:line), a camera out of 1-15; ``list_val.txt`` only when ``DATASETS.COMBINEALL``
  adds its images (``engine.compat`` lets FastReID's reader do without it otherwise).

``describe_dataset`` names the variant: MSMT17_V1 or MSMT17_V2 (V2 blurs faces; numbers are not
comparable across the two), CUHK03 labeled or detected boxes. FastReID's ``CUHK03`` reads the
labeled boxes under the new protocol (CUHK03-NP, 767 training / 700 test identities), as the
paper's Table 2 reports; ``CUHK03Detected``, registered here, reads the detected boxes.
"""
import glob
import os
import re

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.cuhk03 import CUHK03

from ..utils.errors import InputError

# name -> (folder under the datasets root, file-name example, highest identity, cameras)
MARKET_LIKE = {"Market1501": ("Market-1501-v15.09.15", "0002_c1s1_000451_03.jpg", 1501, 6),
               "DukeMTMC": ("DukeMTMC-reID", "0001_c2_f0046182.jpg", None, 8)}
MARKET_SPLITS = ("bounding_box_train", "query", "bounding_box_test")
READER_PATTERN = re.compile(r"([-\d]+)_c(\d)")          # FastReID's Market and Duke readers', over the path
MSMT17_VERSIONS = ("MSMT17_V1", "MSMT17_V2")             # FastReID takes the first it finds
MSMT17_CAMERAS = 15


@DATASET_REGISTRY.register()
class CUHK03Detected(CUHK03):
    """CUHK03-NP on the detected boxes (FastReID's ``CUHK03`` reads the labeled ones): the same
    folder, ``.mat`` files and conversion."""

    def __init__(self, root="datasets", **kwargs):
        kwargs.pop("cuhk03_labeled", None)
        super().__init__(root=root, cuhk03_labeled=False, **kwargs)


def describe_dataset(name, root):
    """The variant of dataset ``name`` under ``root`` a run trains or tests on, in words."""
    if name == "MSMT17":
        version = msmt17_version(root)
        return f"MSMT17, {version}" + (" (faces blurred)" if version == "MSMT17_V2" else "") if version else name
    if name == "CUHK03":
        return "CUHK03-NP, labeled boxes (new protocol: 767 training / 700 test identities)"
    if name == "CUHK03Detected":
        return "CUHK03-NP, detected boxes (new protocol: 767 training / 700 test identities)"
    if name in MARKET_LIKE:
        folder = MARKET_LIKE[name][0]
        return folder if os.path.isdir(os.path.join(root, folder)) else f"{name} (folders directly under {root})"
    return name


def msmt17_version(root):
    """The MSMT17 version folder FastReID's reader uses under ``root``, or None."""
    return next((v for v in MSMT17_VERSIONS if os.path.exists(os.path.join(root, v))), None)


def check_real_dataset(name, root, combineall=False):
    """Raise InputError naming the file, line or folder at fault if dataset ``name`` under ``root``
    has a slip FastReID's reader would fail on, or read wrong (the four real datasets; other
    names pass)."""
    if name in MARKET_LIKE:
        _check_market_like(name, root)
    elif name == "MSMT17":
        _check_msmt17(root, combineall)


def _check_market_like(name, root):
    folder, example, max_pid, cameras = MARKET_LIKE[name]
    data_dir = os.path.join(root, folder) if os.path.isdir(os.path.join(root, folder)) else root
    for split in MARKET_SPLITS:
        split_dir = os.path.join(data_dir, split)
        paths = sorted(glob.glob(os.path.join(glob.escape(split_dir), "*.jpg")))
        for path in paths:
            base = os.path.basename(path)
            match = READER_PATTERN.match(base)
            if match is None:
                raise InputError(f"dataset {name}: {path}: not a {name} image name (PID_cCAM..., e.g. {example}); "
                                 f"move it out of {split_dir}")
            first = READER_PATTERN.search(path)
            if first.start() != len(path) - len(base):
                raise InputError(f"dataset {name}: the path {split_dir} holds {first.group(0)!r}, which FastReID's "
                                 f"reader would take as every image's identity and camera: move the dataset to a "
                                 f"path without it")
            try:
                pid, camera = int(match.group(1)), int(match.group(2))
            except ValueError:
                raise InputError(f"dataset {name}: {path}: identity {match.group(1)!r} is not a number") from None
            if pid != -1 and (pid < 0 or (max_pid is not None and pid > max_pid)):
                raise InputError(f"dataset {name}: {path}: identity {pid} out of range "
                                 f"(-1 junk, 0 distractor, 1-{max_pid or 'N'})")
            if not 1 <= camera <= cameras:
                raise InputError(f"dataset {name}: {path}: camera {camera} out of range 1-{cameras}")


def _check_msmt17(root, combineall):
    version = msmt17_version(root)
    if version is None:
        raise InputError(f"dataset MSMT17: neither MSMT17_V1/ nor MSMT17_V2/ in {os.path.abspath(root)} "
                         f"(set FASTREID_DATASETS to the folder holding one)")
    base = os.path.join(root, version)
    for list_name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"):
        path = os.path.join(base, list_name)
        if not os.path.isfile(path):
            if list_name == "list_val.txt" and not combineall:
                continue                     # read only to be added by DATASETS.COMBINEALL
            raise InputError(f"dataset MSMT17: {path} not found" + (
                " (DATASETS.COMBINEALL True adds its images to training)" if list_name == "list_val.txt" else ""))
        _check_msmt17_list(path)


def _check_msmt17_list(path):
    """Every line as FastReID's reader splits it: ``FOLDER/NAME.jpg PID``, one space, the camera
    the third ``_`` field of NAME (1-15)."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split(" ")
            where = f"dataset MSMT17: {path}:{number}"
            if not line.strip():
                raise InputError(f"{where}: a blank line (expected 'FOLDER/NAME.jpg PID')")
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise InputError(f"{where}: expected 'FOLDER/NAME.jpg PID' separated by one space, found "
                                 f"{line.strip()[:80]!r}")
            fields = os.path.basename(parts[0]).split("_")
            if len(fields) < 3 or not fields[2].isdigit():
                raise InputError(f"{where}: {parts[0]} has no camera number as its third '_' field "
                                 f"(e.g. 0000_000_01_0303morning_0015_0.jpg)")
            if not 1 <= int(fields[2]) <= MSMT17_CAMERAS:
                raise InputError(f"{where}: {parts[0]}: camera {int(fields[2])} out of range 1-{MSMT17_CAMERAS}")
