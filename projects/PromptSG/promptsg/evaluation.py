"""The chance level of the Market-1501 retrieval protocol, to read mAP / Rank-1 figures against."""
import numpy as np


def chance_level(q_pids, q_camids, g_pids, g_camids):
    """Expected (mAP, Rank-1), as fractions, of a random ranking under the Market-1501 protocol.

    For a query with m valid matches among N valid gallery images (gallery images of the
    query's identity from the query's camera removed), a uniformly random ranking gives
    E[AP] = (H_N + (m - 1) / (N - 1) * (N - H_N)) / N  (H_N the N-th harmonic number) and
    P(rank-1 is a match) = m / N. Queries with no valid match are skipped, as FastReID does.
    """
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    aps, top1 = [], []
    for pid, cam in zip(q_pids, q_camids):
        valid = ~((g_pids == pid) & (g_camids == cam))
        n, m = int(valid.sum()), int(((g_pids == pid) & valid).sum())
        if m == 0:
            continue
        harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
        aps.append((harmonic + (m - 1) / max(n - 1, 1) * (n - harmonic)) / n)
        top1.append(m / n)
    return float(np.mean(aps)), float(np.mean(top1))
