"""A full disk loses nothing and says so: one line naming the folder and the space needed, no
temporary file left behind, the final checkpoint written once, the results written even when a
final checkpoint cannot be, and ``--resume`` refused in one line when the next checkpoint cannot fit.

Two ways to fill a disk: a small tmpfs where this machine lets the tests mount one (root on
Linux), and an injected ENOSPC everywhere else."""
import errno
import json
import os
import subprocess

import pytest
import torch

import promptsg  # noqa: F401
from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer, default_argument_parser
from promptsg.engine import checkpoint as checkpoint_module
from promptsg.engine import trainer as trainer_module
from promptsg.engine.checkpoint import AtomicCheckpointer as Checkpointer, DiskFullError

from tiny_runs import PROMPTSG_CFG, TINY, one_line_error, run

ONE_EPOCH = ["SOLVER.MAX_EPOCH", "1", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1"]


def tiny_model():
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_file(PROMPTSG_CFG)
    cfg.merge_from_list([*TINY, "MODEL.HEADS.NUM_CLASSES", "5", "MODEL.DEVICE", "cpu"])
    return DefaultTrainer.build_model(cfg)


def test_a_checkpoint_the_disk_cannot_hold_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    model = tiny_model()
    checkpointer = Checkpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000")
    kept = (tmp_path / "model_0000.pth").read_bytes()
    real_save = torch.save

    def save_until_the_disk_is_full(data, path):
        real_save(data, path)                                  # the bytes written so far ...
        with open(path, "r+b") as f:
            f.truncate(1000)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 998")   # ... torch's words

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    monkeypatch.setattr(checkpoint_module, "free_bytes", lambda folder: 3 * 1024 * 1024)
    with pytest.raises(DiskFullError) as full:
        checkpointer.save("model_0000")
    message = full.value.strerror
    need = checkpoint_module.checkpoint_bytes({"model": model.state_dict()}) / 2 ** 20
    assert message == (f"no space left in {tmp_path} to write model_0000.pth: 3.0 MB free, the checkpoint needs "
                       f"about {need:.1f} MB; free space (earlier files are whole)")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000.pth"]   # no model_0000.pth.tmp
    assert (tmp_path / "model_0000.pth").read_bytes() == kept
    # an error that is not a full disk (space to spare) is not reported as one
    monkeypatch.setattr(checkpoint_module, "free_bytes", lambda folder: 10 ** 12)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpointer.save("model_0001")
    assert not (tmp_path / "model_0001.pth.tmp").exists()


def train_in_process(tmp_path, datasets_root, monkeypatch, *opts):
    """A one-epoch tiny run of tools/train_net.py's per-process step (``train_and_evaluate``), in
    this process; every checkpoint written is recorded by name."""
    import fastreid.data.build as data_build

    monkeypatch.setattr(data_build, "_root", str(datasets_root))
    monkeypatch.setenv("FASTREID_DATASETS", str(datasets_root))
    saved = []
    real_save = Checkpointer.save

    def recording_save(self, name, **kwargs):
        saved.append(name)
        return real_save(self, name, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", recording_save)
    args = default_argument_parser().parse_args(["--config-file", PROMPTSG_CFG, *TINY, *ONE_EPOCH,
                                                 "OUTPUT_DIR", str(tmp_path), *opts])
    return args, saved


def test_the_final_checkpoint_is_written_once(tmp_path, datasets_root, monkeypatch):
    args, saved = train_in_process(tmp_path, datasets_root, monkeypatch)
    trainer_module.train_and_evaluate(args)
    assert saved.count("model_final") == 1 and saved == ["model_final", "model_best"], saved
    assert json.loads((tmp_path / "results.json").read_text())["mAP"] > 0


def test_results_are_written_when_the_final_checkpoint_cannot_be(tmp_path, datasets_root, monkeypatch):
    args, saved = train_in_process(tmp_path, datasets_root, monkeypatch)
    real_save = Checkpointer.save

    def final_does_not_fit(self, name, **kwargs):
        if name == "model_final":
            saved.append(name)
            raise checkpoint_module.disk_full(os.path.join(self.save_dir, "model_final.pth"), 40 * 2 ** 20)
        return real_save(self, name, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", final_does_not_fit)
    with pytest.raises(DiskFullError, match="to write model_final.pth"):
        trainer_module.train_and_evaluate(args)
    results = json.loads((tmp_path / "results.json").read_text())      # evaluated and written all the same
    assert results["mAP"] > 0 and "model_final" in saved
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_results_json_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    cfg = promptsg.add_promptsg_config(get_cfg())
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path)])
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("results.json.tmp"):
            handle = real_open(path, mode, *args, **kwargs)
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFullError, match=f"no space left in {tmp_path} to write results.json"):
        trainer_module.save_results(cfg, {"mAP": 1.0}, "results.json")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# ---- a real full disk: a small tmpfs ----

@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs; the test is skipped (and says why) where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): the injected "
                    f"ENOSPC tests above cover this machine")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave):
    """Fill ``disk`` up to ``leave`` bytes free (a ballast file)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "ballast", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_on_a_full_tmpfs_nothing_is_lost_and_resume_says_so(small_disk, datasets_root):
    out = small_disk / "run"
    fill(small_disk, 0)
    (small_disk / "ballast").unlink()
    # a run whose final checkpoint fits once but model_best no longer does
    probe = run(["--config-file", PROMPTSG_CFG, *TINY, *ONE_EPOCH, "OUTPUT_DIR", str(small_disk / "probe")],
                datasets_root)
    assert probe.returncode == 0, probe.stderr[-2000:]
    size = os.path.getsize(small_disk / "probe" / "model_final.pth")
    for name in os.listdir(small_disk / "probe"):
        os.remove(small_disk / "probe" / name)
    fill(small_disk, int(1.5 * size))
    result = run(["--config-file", PROMPTSG_CFG, *TINY, *ONE_EPOCH, "OUTPUT_DIR", str(out)], datasets_root)
    last = one_line_error(result, f"no space left in {out} to write model_best.pth", "MB free",
                          before_training=False)
    assert "Traceback" not in last and "inline_container" not in result.stderr
    assert json.loads((out / "results.json").read_text())["mAP"] > 0
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    checkpoint_module.read_checkpoint(str(out / "model_final.pth"))          # whole
    # --resume with no room for one more checkpoint: one line before training
    os.remove(small_disk / "ballast")
    (out / "results.json").unlink()
    fill(small_disk, size // 2)
    result = run(["--config-file", PROMPTSG_CFG, "--resume", *TINY, "SOLVER.MAX_EPOCH", "2", "TEST.EVAL_PERIOD", "2",
                  "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(out)], datasets_root)
    one_line_error(result, f"no space left in {out} to write model_NNNN.pth", "a checkpoint like model_")
    assert "Traceback" not in result.stderr
