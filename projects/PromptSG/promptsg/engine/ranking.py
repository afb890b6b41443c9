"""FastReID's ReID metrics (AP, CMC, mINP) ranked one chunk of queries at a time, in bounded memory.

FastReID's ``ReidEvaluator`` builds the whole queries x gallery distance matrix and argsorts it:
at MSMT17's 11,659 x 82,161 that is 3.8 GB of distances and 7.7 GB of int64 ranks, 12.75 GB at
peak. The metrics need less. Under the Market-1501 protocol (gallery images of the query's
identity from the query's camera left out; a query with no remaining match skipped), a query's
AP, its CMC and its INP depend only on where its m matches land among the valid gallery images.
With the matches' distances sorted, s_0 <= ... <= s_{m-1}, match j stands at position

    pos_j = j + #{valid non-matches with distance < s_j}                       (0-based)

and  AP = mean_j (j + 1) / (pos_j + 1),  CMC@k = [pos_0 < k],  INP = m / (pos_{m-1} + 1).
Each valid non-match is placed among the m sorted match distances by a batched ``searchsorted``
and the gaps are counted with one ``bincount``: O(G log m) per query instead of FastReID's
O(G log G) argsort, whatever the features, and nothing larger than the chunk is kept.

Equal distances between a match and a valid non-match are the one case where the order matters
and the formula cannot say which comes first: FastReID's unstable argsort decides. Such queries
(rare with real features) are ranked by FastReID's own ``evaluate_rank`` on their distance row,
so the metrics are FastReID's for every query. The distance chunks are FastReID's ``build_dist``
on at least ``MIN_ROWS`` query rows: on the CPU the same bits as its whole matrix (checked in
tests/test_ranking.py).
"""
import numpy as np
import torch
import torch.nn.functional as F

MAX_RANK = 50          # FastReID's evaluate_rank default: the CMC curve's length
MIN_ROWS = 64          # fewer query rows may take another BLAS kernel than the whole matrix


def query_chunks(num_query, chunk):
    """Slices of at most ``chunk`` queries, the remainder joined to the last one, so that every
    slice has at least ``min(chunk, MIN_ROWS)`` rows or is the whole set."""
    chunk = max(int(chunk), MIN_ROWS)
    starts = list(range(0, num_query, chunk))
    if len(starts) > 1 and num_query - starts[-1] < chunk:
        starts.pop()
    ends = starts[1:] + [num_query]
    return [slice(a, b) for a, b in zip(starts, ends)]


class GalleryDistances:
    """Distances of query chunks to one gallery as FastReID's ``build_dist`` computes them (the
    same bits on the CPU for chunks of at least ``MIN_ROWS`` rows): ``cosine`` 1 - cos,
    ``euclidean`` the squared L2 distance. The gallery is prepared once (normalised, or its
    squared norms), on ``device``."""

    def __init__(self, gallery, metric, device="cpu"):
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"TEST.METRIC {metric!r}: expected 'cosine' or 'euclidean'")
        self.metric, self.device = metric, torch.device(device)
        gallery = gallery.to(self.device, torch.float32)
        if metric == "cosine":
            self.gallery = F.normalize(gallery, dim=1)
        else:
            self.gallery, self.squared = gallery, gallery.pow(2).sum(1)

    @torch.no_grad()
    def __call__(self, query):
        """(q, D) features -> (q, G) float32 distances on the gallery's device."""
        query = query.to(self.device, torch.float32)
        if self.metric == "cosine":
            return torch.mm(F.normalize(query, dim=1), self.gallery.t()).neg_().add_(1)
        dist = query.pow(2).sum(1, keepdim=True) + self.squared[None]
        return dist.addmm_(query, self.gallery.t(), beta=1, alpha=-2)


def metric_distances(query, gallery, metric):
    """(q, G) distances of one query chunk: ``GalleryDistances`` for a single use."""
    return GalleryDistances(gallery, metric, query.device)(query)


class RankAccumulator:
    """Per-query AP and INP and the summed CMC, fed one (q, G) distance chunk at a time."""

    def __init__(self, g_pids, g_camids, max_rank=MAX_RANK):
        self.g_pids = torch.as_tensor(np.asarray(g_pids), dtype=torch.int64)
        self.g_camids = torch.as_tensor(np.asarray(g_camids), dtype=torch.int64)
        # the gallery grouped by identity: an identity's images are by_id[first[k]:first[k] + size[k]]
        self.by_id = torch.argsort(self.g_pids, stable=True)
        self.ids, self.size = torch.unique_consecutive(self.g_pids[self.by_id], return_counts=True)
        self.first = torch.cumsum(self.size, 0) - self.size
        self.max_rank = min(max_rank, len(self.g_pids))
        self.all_ap, self.all_inp = [], []
        self.cmc_sum = np.zeros(self.max_rank, dtype=np.float32)
        self.num_queries = 0
        self.tied_queries = 0       # ranked by FastReID's own evaluate_rank (see the module docstring)

    def same_identity(self, q_pids):
        """(q, n) gallery indices of each query's identity, padded with -1 (n: the largest group)."""
        k = torch.searchsorted(self.ids, q_pids).clamp(max=len(self.ids) - 1)
        size = torch.where(self.ids[k] == q_pids, self.size[k], 0)
        offset = torch.arange(int(size.max()) if len(size) else 0)
        index = self.by_id[(self.first[k, None] + offset).clamp(max=len(self.by_id) - 1)]
        return torch.where(offset < size[:, None], index, -1)

    @torch.no_grad()
    def add(self, dist, q_pids, q_camids):
        """dist: (q, G) float32 tensor, rows in query order; q_pids, q_camids: (q,) labels."""
        device = dist.device
        q_pids = torch.as_tensor(np.asarray(q_pids), dtype=torch.int64)
        q_camids = torch.as_tensor(np.asarray(q_camids), dtype=torch.int64)
        if not torch.isfinite(dist.sum()):
            bad = int((~torch.isfinite(dist)).any(1).sum())
            raise ValueError(f"evaluation: {bad} of {len(dist)} queries have non-finite distances "
                             "(NaN or inf features); FastReID would rank them arbitrarily")
        self.num_queries += len(dist)

        # each query's valid matches: its identity's gallery images from other cameras
        same_id = self.same_identity(q_pids)                                       # (q, n)
        match = (same_id >= 0) & (self.g_camids[same_id.clamp(min=0)] != q_camids[:, None])
        num_matches = match.sum(1)
        rows = torch.nonzero(num_matches > 0).squeeze(1)
        if len(rows) == 0:
            return
        same_id, match, num_matches = same_id[rows], match[rows], num_matches[rows]
        if len(rows) < len(dist):
            dist, q_pids, q_camids = dist[rows.to(device)], q_pids[rows], q_camids[rows]
        q, m_max = len(rows), int(num_matches.max())

        # each row's match distances, sorted, padded with +inf: (q, m_max)
        values = dist.gather(1, same_id.clamp(min=0).to(device)).cpu()
        sorted_matches = values.masked_fill(~match, float("inf")).sort(1).values[:, :m_max].contiguous()

        # for every gallery image, how many of the row's matches are not farther (a batched
        # searchsorted into the row's m sorted match distances), then per row how many valid
        # non-matches (other identities) fall in each of the m + 1 gaps: (q, G) -> (q, m_max + 1)
        sorted_matches = sorted_matches.to(device)
        behind = torch.searchsorted(sorted_matches, dist, right=True)                  # (q, G) int64
        tied = (behind > 0) & (sorted_matches.gather(1, (behind - 1).clamp_(min=0)) == dist)
        own = torch.where(same_id >= 0, same_id, same_id[:, :1]).to(device)          # the query's identity
        behind.scatter_(1, own, m_max)                     # not a non-match: counted in no gap below m_max
        tied.scatter_(1, own, False)
        tied = tied.any(1).cpu().numpy()
        behind += (torch.arange(q, device=device) * (m_max + 1))[:, None]
        counts = torch.bincount(behind.view(-1), minlength=q * (m_max + 1)).view(q, m_max + 1).cpu().numpy()
        del behind
        before = np.cumsum(counts, 1)[:, :m_max]               # non-matches before match j: (q, m_max)
        position = (np.arange(m_max)[None] + before).astype(np.float64)

        # AP, INP and the first match's position of each row at once; tied rows by FastReID
        num_matches = num_matches.numpy()
        j = np.arange(m_max)
        counted = j[None] < num_matches[:, None]
        ap = np.where(counted, (j[None] + 1) / (position + 1), 0).sum(1) / num_matches
        inp = num_matches / (position[np.arange(q), num_matches - 1] + 1)
        for k in np.flatnonzero(tied):
            ap[k], inp[k] = self._add_fastreid(dist[k:k + 1], q_pids[k:k + 1], q_camids[k:k + 1])
        self.all_ap.extend(ap.tolist())
        self.all_inp.extend(inp.tolist())
        first = np.bincount(np.minimum(position[~tied, 0], self.max_rank).astype(np.int64), minlength=self.max_rank + 1)
        self.cmc_sum += np.cumsum(first[:self.max_rank]).astype(np.float32)

    def _add_fastreid(self, dist, q_pids, q_camids):
        from fastreid.evaluation.rank import evaluate_rank

        cmc, all_ap, all_inp = evaluate_rank(dist.cpu().numpy(), q_pids.numpy(), self.g_pids.numpy(),
                                             q_camids.numpy(), self.g_camids.numpy(), self.max_rank)
        self.cmc_sum += np.asarray(cmc, dtype=np.float32)
        self.tied_queries += 1
        return all_ap[0], all_inp[0]

    def result(self):
        """(cmc, all_AP, all_INP) as FastReID's ``evaluate_rank`` returns them: float32 arrays, so
        that their means round as FastReID's do."""
        if not self.all_ap:
            raise ValueError(f"evaluation: none of the {self.num_queries} queries has a gallery image of "
                             "its identity from another camera")
        return (self.cmc_sum / np.float32(len(self.all_ap)), np.asarray(self.all_ap, dtype=np.float32),
                np.asarray(self.all_inp, dtype=np.float32))


def evaluate_in_chunks(distance_chunks, q_pids, q_camids, g_pids, g_camids, max_rank=MAX_RANK):
    """FastReID's ``evaluate_rank`` over distances given as ``(query_slice, (q, G) tensor)`` pairs.

    Returns ``(cmc, all_AP, all_INP, accumulator)``; only one chunk is held at a time.
    """
    acc = RankAccumulator(g_pids, g_camids, max_rank)
    q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
    for rows, dist in distance_chunks:
        acc.add(dist, q_pids[rows], q_camids[rows])
    return (*acc.result(), acc)
