"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as FastReID's ``ReidEvaluator`` runs it, kept sparse.

FastReID's ``compute_jaccard_distance`` (``build_dist(metric="jaccard")``) fills three dense
N x N matrices, N = queries + gallery: the k-reciprocal weights V, their query expansion V_qe and
the Jaccard distances. At MSMT17's N = 93,820 each is 35 GB in float32. Here every step keeps
only what is not zero:

  1. R: each image's k1 nearest neighbours by faiss ``IndexFlatL2``, as FastReID searches them
     (on the GPU when faiss has one): (N, k1).
  2. k-reciprocal sets: j in R(i) with i in R(j)[: k1 + 1]; the half sets with round(k1 / 2).
     A neighbour's half set joins i's set when more than 2/3 of it is already there.
  3. V[i, j] = softmax over i's expanded set of -||x_i - x_j||^2: a CSR matrix, about k1 to a
     few times k1 non-zeros per row.
  4. V_qe[i] = mean of V over R(i)[: k2] (a sparse product).
  5. Only the query rows of the Jaccard distance, against the gallery, one chunk of queries at a
     time: d_J(i, j) = 1 - t / (2 - t), t = sum_k min(V_qe[i, k], V_qe[j, k]), summed over the
     columns k where both are non-zero (an inverted index by column, as FastReID's).

The evaluator then ranks d = (1 - lambda) d_J + lambda d_metric, as FastReID does. Steps 2-5 are
numpy and scipy on the CPU; the sums run in another order than FastReID's float32 loops, so the
distances agree to float tolerance (tests/test_ranking.py).
"""
import numpy as np
import scipy.sparse as sp
import torch

ROWS_PER_STEP = 2048          # images per vectorised step of 2-3: bounds the (rows, k1, k1) arrays


def nearest_neighbours(features, k):
    """(N, k) int64 indices of each row's k nearest rows by squared L2 (itself first, barring
    duplicates), by faiss's exact ``IndexFlatL2``: FastReID's search; on the GPU when faiss has one."""
    import faiss

    x = np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    if faiss.get_num_gpus() > 0 and torch.cuda.is_available():
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, torch.cuda.current_device(), index)
    index.add(x)
    _, ranks = index.search(x, k)
    return ranks.astype(np.int64)


def reciprocal_mask(ranks, width):
    """(N, width) bool: is i among the first ``width`` neighbours of its a-th neighbour ranks[i, a]?"""
    head = ranks[:, :width]
    mask = np.empty(head.shape, dtype=bool)
    for a in range(0, len(head), ROWS_PER_STEP):
        rows = np.arange(a, min(a + ROWS_PER_STEP, len(head)))
        mask[rows] = (head[head[rows]] == rows[:, None, None]).any(-1)
    return mask


def expanded_sets(ranks, k1):
    """Each image's k-reciprocal set, expanded by its neighbours' half sets, as (N, width) indices
    padded with -1 (each row's entries unique)."""
    half = int(np.around(k1 / 2))
    full_ids = np.where(reciprocal_mask(ranks, k1 + 1), ranks[:, :k1 + 1], -1)            # R*(i)
    half_ids = np.where(reciprocal_mask(ranks, half + 1), ranks[:, :half + 1], -1)        # R*(i, k1/2)
    half_sizes = (half_ids >= 0).sum(1)
    n, width = full_ids.shape
    out = []
    for a in range(0, n, ROWS_PER_STEP):
        own = full_ids[a:a + ROWS_PER_STEP]                                              # (r, w)
        cand_half = half_ids[np.maximum(own, 0)]                                         # (r, w, h+1)
        # |half set of candidate c  intersected with  i's set| > 2/3 |half set of c|
        shared = ((cand_half[..., None] == own[:, None, None, :]) & (cand_half[..., None] >= 0)).any(-1).sum(-1)
        accept = (own >= 0) & (shared > 2 / 3 * half_sizes[np.maximum(own, 0)])
        joined = np.concatenate([own, np.where(accept[..., None], cand_half, -1).reshape(len(own), -1)], 1)
        joined.sort(1)
        joined[:, 1:][joined[:, 1:] == joined[:, :-1]] = -1                               # duplicates
        joined.sort(1)
        out.append(joined)
    width = max(int((block >= 0).sum(1).max()) for block in out)
    return np.concatenate([block[:, block.shape[1] - width:] for block in out])


@torch.no_grad()
def reciprocal_weights(features, sets):
    """CSR (N, N) float32: V[i, j] = softmax over j in sets[i] of -||x_i - x_j||^2."""
    n = len(sets)
    indptr, indices, data = [0], [], []
    for a in range(0, n, ROWS_PER_STEP // 4):
        block = torch.from_numpy(sets[a:a + ROWS_PER_STEP // 4])
        x = features[a:a + len(block)]                                                  # (r, D)
        y = features[block.clamp(min=0)]                                                # (r, w, D)
        dist = x.pow(2).sum(1)[:, None] + y.pow(2).sum(2) - 2 * torch.einsum("rd,rwd->rw", x, y)
        weight = torch.softmax(dist.neg().masked_fill(block < 0, float("-inf")), dim=1)
        keep = (block >= 0).numpy()
        indices.append(block.numpy()[keep])
        data.append(weight.numpy()[keep])
        indptr.extend((indptr[-1] + np.cumsum(keep.sum(1))).tolist())
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.asarray(indptr)), shape=(n, n))


def query_expansion(weights, ranks, k2):
    """V_qe[i] = mean of V's rows ranks[i, :k2] (CSR)."""
    if k2 == 1:
        return weights
    n = weights.shape[0]
    average = sp.csr_matrix((np.full(n * k2, 1.0 / k2, dtype=np.float32), ranks[:, :k2].ravel(),
                             np.arange(0, n * k2 + 1, k2)), shape=(n, n))
    expanded = (average @ weights).tocsr()
    expanded.sort_indices()
    return expanded


def jaccard_rows(left, right):
    """(rows of ``left``, rows of ``right``) float32 Jaccard distances 1 - t / (2 - t), t the sum of
    the element-wise minimum of two images' V_qe rows. ``left``: V_qe's rows of the queries (CSR);
    ``right``: V_qe's rows of the gallery as CSC (column k lists the images that use k)."""
    left = left.tocoo()
    start, stop = right.indptr[left.col], right.indptr[left.col + 1]
    length = stop - start
    pair_row = np.repeat(left.row, length)
    offsets = np.repeat(stop - np.cumsum(length), length) + np.arange(length.sum())
    shared = np.minimum(np.repeat(left.data, length), right.data[offsets])
    width = right.shape[0]
    t = np.bincount(pair_row * width + right.indices[offsets], weights=shared, minlength=left.shape[0] * width)
    t = t.reshape(left.shape[0], width).astype(np.float32)
    return np.maximum(1 - t / (2 - t), 0, dtype=np.float32)


class SparseReranker:
    """The Jaccard distances of FastReID's re-ranking, one chunk of query rows at a time.

    ``query`` and ``gallery`` are the features the evaluator would pass to
    ``build_dist(metric="jaccard")`` (L2-normalised under TEST.METRIC cosine).
    """

    def __init__(self, query, gallery, k1=20, k2=6):
        features = torch.cat([query, gallery]).float().cpu()
        if not 1 <= k2 <= k1 < len(features):
            raise ValueError(f"TEST.RERANK: need 1 <= K2 ({k2}) <= K1 ({k1}) < queries + gallery ({len(features)})")
        self.num_query, self.num_total = len(query), len(features)
        ranks = nearest_neighbours(features, k1)
        expanded = query_expansion(reciprocal_weights(features, expanded_sets(ranks, k1)), ranks, k2)
        self.query_rows, self.gallery_columns = expanded[:len(query)], expanded[len(query):].tocsc()

    def distances(self, rows):
        """(len(rows), G) float32 Jaccard distances of the queries ``rows`` (a slice) to the gallery."""
        return jaccard_rows(self.query_rows[rows], self.gallery_columns)
