#!/usr/bin/env python
"""Mutation check of the fault and tooling tests: each slip below, applied alone to a copy of the
package, must make the tests named beside it fail.

    python tests/mutations/slips.py             # one line per slip, exits 1 if one survives

``wiring.py`` holds the slips in how the model wires the paper's formulas; these are slips in what
surrounds it: diagnostics, start-up checks, checkpoints, resuming, FastReID patches, the output
folder's lock, config files, the synthetic dataset's reuse, the evaluation's query counts, the
ranking in query chunks, sparse re-ranking, SLURM steps, the gallery index, the SIE camera and
the ONNX check. Each passed the tests closest to it once; each now has a test against an
independent expectation.
"""
import sys

from wiring import check

FAULTS = "tests/test_faults.py::"
GUARDS = "tests/test_run_guards.py::"
MODEL = "tests/test_promptsg_model.py::"
RANKING = "tests/test_ranking.py::"
INDEX = "tests/test_gallery_index.py::"

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
    # Slips of the ranking, launch, gallery-index, API, config, dataset and export code.
    ("a full last query chunk merged into the one before", "engine/ranking.py",
     "num_query - starts[-1] < chunk:", "num_query - starts[-1] <= chunk:",
     [RANKING + "test_query_chunks_cover_the_queries_with_no_short_chunk"]),
    ("sparse re-ranking's half sets of k1 // 2 (FastReID rounds k1 / 2)", "engine/sparse_rerank.py",
     "half = int(np.around(k1 / 2))", "half = k1 // 2",
     [RANKING + "test_sparse_jaccard_equals_fastreid"]),
    ("TEST.ROC evaluated in query chunks (its TPR@FPR keys lost)", "engine/evaluation.py",
     " and not cfg.TEST.ROC.ENABLED and ", " and ",
     [RANKING + "test_roc_keeps_fastreid_s_dense_path_and_its_tpr_keys"]),
    ("an OUTPUT_DIR with glob characters read as a pattern (run[1] trained over)", "engine/output_dir.py",
     "glob.glob(os.path.join(glob.escape(path), pattern))", "glob.glob(os.path.join(path, pattern))",
     [GUARDS + "test_a_refused_start_leaves_the_lock_undescribed_and_glob_characters_are_literal"]),
    ("SLURM's extern step taken for a launched job step", "engine/launcher.py",
     'not in ("batch", "extern")', 'not in ("batch",)',
     ["tests/test_launch.py::test_the_batch_script_itself_is_not_a_launched_process"]),
    ("gallery index add: a folder and a file inside it add the image twice", "gallery_index.py",
     "        seen.add(real)\n", "",
     [INDEX + "test_an_image_reached_twice_is_added_once"]),
    ("gallery index fingerprint without the SIE camera", "gallery_index.py",
     'settings["camera"] = camera', 'settings["camera"] = 0',
     [INDEX + "test_the_fingerprint_holds_the_sie_camera"]),
    ("gallery index add in chunks keeps only the first chunk", "gallery_index.py",
     "for start in range(0, len(features), chunk):", "for start in range(0, min(len(features), chunk), chunk):",
     [INDEX + "test_adding_in_chunks_keeps_every_chunk"]),
    ("an SIE camera equal to the number of cameras accepted", "engine/preflight.py",
     "camera is None or not 0 <= camera < cameras:", "camera is None or not 0 <= camera <= cameras:",
     ["tests/test_api.py::test_the_sie_camera_must_be_a_training_camera"]),
    ("a map fusion with two cross-attention layers passes validation", "config.py",
     "(p.MIM.CROSS_LAYERS != 1 or p.MIM.SELF_LAYERS < 1)", "(p.MIM.SELF_LAYERS < 1)",
     [FAULTS + "test_a_map_fusion_needs_one_cross_layer_and_a_self_block"]),
    ("a synthetic folder another process installs meanwhile accepted whatever its parameters",
     "data/synthetic/folders.py",
     'if current is None or current.get("params") != params or _differences(current, dataset_dir, layout):',
     "if current is None:",
     ["tests/test_synthetic_dataset.py::test_a_folder_another_process_installs_meanwhile_is_used_only_if_it_is_the_same"]),
    ("NaN features from onnxruntime pass the agreement check", "export/onnx_export.py",
     "if not cosine.min() >= MIN_COSINE:", "if cosine.min() < MIN_COSINE:",
     ["tests/test_export_onnx.py::test_nan_features_from_onnxruntime_fail_the_agreement_check"]),
]


def main(argv=None):
    """``python tests/mutations/slips.py [WORDS]``: every slip, or those whose name holds WORDS."""
    words = " ".join(sys.argv[1:] if argv is None else argv)
    return check([s for s in SLIPS if words in s[0]], "slips")


if __name__ == "__main__":
    sys.exit(main())
