#!/usr/bin/env python
"""Mutation check of the fault and tooling tests: each slip below, applied alone to a copy of the
package, must make the tests named beside it fail.

    python tests/mutations/slips.py             # one line per slip, exits 1 if one survives

``wiring.py`` holds the slips in how the model wires the paper's formulas; these are slips in what
surrounds it: diagnostics, start-up checks, checkpoints, resuming, FastReID patches, the output
folder's lock, config files, the synthetic dataset's reuse and the evaluation's query counts. The
first eight passed the tests closest to them once; each now has a test against an independent
expectation.
"""
import sys

from wiring import check

FAULTS = "tests/test_faults.py::"
GUARDS = "tests/test_run_guards.py::"
MODEL = "tests/test_promptsg_model.py::"

# (name, file in the package, text, replacement, the tests that must catch it)
SLIPS = [
    ("prompt->image top-1 computed in the image->prompt direction", "modeling/diagnostics.py",
     "cols = same.gather(0, similarity.argmax(0, keepdim=True)).float().mean()",
     "cols = same.gather(1, similarity.argmax(1, keepdim=True)).float().mean()",
     [MODEL + "test_in_batch_top1_by_hand"]),
    ("f_theta loses an activation (two linear maps in a row)", "modeling/inversion.py",
     "nn.Linear(hidden_dim, hidden_dim),\n            nn.ReLU(inplace=True),\n",
     "nn.Linear(hidden_dim, hidden_dim),\n",
     [MODEL + "test_inversion_net_output_by_hand_relu_between_every_linear_layer"]),
    ("the start-up image check skips the gallery", "engine/preflight.py",
     "dataset.train + dataset.query + dataset.gallery", "dataset.train + dataset.query",
     [FAULTS + "test_truncated_gallery_and_training_images_are_found_at_start_up"]),
    ("the verified-image cache keyed by size only", "engine/preflight.py",
     "stamps[path] = [st.st_size, st.st_mtime_ns]", "stamps[path] = [st.st_size]",
     [FAULTS + "test_an_image_changed_at_the_same_size_is_checked_again"]),
    ("the test-loader workers patch misses fastreid.engine.defaults", "engine/compat/data.py",
     "for module in (data_build, data, defaults):", "for module in (data_build, data):",
     ["tests/test_distributed.py::test_every_fastreid_module_builds_the_test_loader_with_the_config_s_workers"]),
    ("a checkpoint without the ID classifier accepted without WEIGHTS_NEW_CLASSIFIER", "engine/checkpoint.py",
     "missing = [k for k in model_state if k not in checkpoint_state]",
     "missing = [k for k in model_state if k not in checkpoint_state and k not in CLASSIFIER_KEYS]",
     [FAULTS + "test_a_checkpoint_without_the_classifier_needs_weights_new_classifier"]),
    ("--resume restores torch's and NumPy's RNG but not Python's", "engine/checkpoint.py",
     "random.setstate((state", "(random.getstate, (state",
     [FAULTS + "test_rng_states_restore_torch_numpy_and_python"]),
    ("FEATURE concat with its two parts in the other order", "modeling/heads.py",
     "torch.cat([fused, visual.embedding], dim=1)", "torch.cat([visual.embedding, fused], dim=1)",
     [MODEL + "test_concat_feature_is_the_mim_output_then_v"]),
    ("the OUTPUT_DIR lock never taken", "engine/output_dir.py",
     "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "fcntl.LOCK_EX",
     [GUARDS + "test_one_process_cannot_hold_a_folder_twice_and_a_release_frees_it"]),
    ("a duplicate config key kept silently", "engine/preflight.py", "if key in first:", "if False:",
     [GUARDS + "test_a_duplicate_key_or_section_is_refused_naming_file_key_and_lines"]),
    ("a synthetic folder of another generator version reused", "data/synthetic/folders.py",
     'if stale or existing.get("params") != params:', 'if existing.get("params") != params:',
     ["tests/test_synthetic_dataset.py::test_a_folder_of_another_generator_version_is_refused_until_regenerated"]),
    ("skipped queries counted as evaluated", "engine/evaluation.py", "= evaluated, total - evaluated", "= total, 0",
     [GUARDS + "test_skipped_queries_are_counted_in_the_results_and_the_log"]),
    ("a same-camera gallery image counted as a valid match", "engine/preflight.py",
     "cameras.get(pid, set()) - {camid}", "cameras.get(pid, set())",
     [GUARDS + "test_valid_queries_follow_the_market_protocol_by_hand"]),
]


def main():
    return check(SLIPS, "slips")


if __name__ == "__main__":
    sys.exit(main())
