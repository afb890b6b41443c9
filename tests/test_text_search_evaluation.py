"""The text-search benchmark's split and scoring (promptsg.analysis.text_search_evaluation, run by
tools/evaluate_text_search.py) on the tiny synthetic split: each identity's words are its
generator caption's, the control gives another identity's different words, a words-only query has
every gallery image of its identity as a positive, and the paired AP change is counted by hand."""
import numpy as np
import pytest

import promptsg  # noqa: F401  (patches FastReID, registers the datasets)
from promptsg.analysis.text_search_evaluation import EvaluationSplit, paired


@pytest.fixture(scope="module")
def split(datasets_root):
    return EvaluationSplit("SyntheticMarketTiny", str(datasets_root))


def test_words_are_each_identitys_caption_and_the_control_anothers(split):
    assert split.pids == sorted({pid for _, pid, _ in split.query})
    for pid in split.pids:
        assert split.captions[pid] == "a person " + split.words[pid] + "."
        assert split.other_words[pid] != split.words[pid]
        assert split.other_words[pid] in {split.words[p] for p in split.pids if p != pid}


def test_a_words_only_query_has_every_gallery_image_of_its_identity_as_a_positive(split):
    g_pids = np.array(split.g_pids)
    own_first = np.array([(g_pids != pid).astype(np.float32) for pid in split.pids])
    assert split.words_only(own_first)["mAP"] == pytest.approx(100.0)
    # The identity's images ranked last: AP is then m / N * (mean over k of k / (N - m + k)), by hand.
    own_last = 1 - own_first
    expected = []
    for pid in split.pids:
        n, m = len(g_pids), int((g_pids == pid).sum())
        expected.append(np.mean([k / (n - m + k) for k in range(1, m + 1)]))
    assert split.words_only(own_last)["mAP"] == pytest.approx(100 * np.mean(expected))


def test_paired_ap_change_counts_the_queries_up_and_down():
    rows = {"words": {"ap": [0.5, 0.2, 0.9, 0.6]}, "image": {"ap": [0.4, 0.2, 1.0, 0.3]}}
    assert paired(rows, "words", "image") == {"mean_ap_change": pytest.approx(100 * (0.1 + 0 - 0.1 + 0.3) / 4),
                                              "queries_up": 2, "queries_down": 1, "queries": 4}
