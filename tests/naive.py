"""Slow, obviously-correct twins of pkd's Numba kernels (explicit Python loops).

Each kernel in ``pkd/kernels`` has a twin here that the tests compare against.
"""

import numpy as np


def optimal_mapping(cost, student_layers=None):
    """Brute force for ``pkd.mapping.optimal``: try every strictly increasing teacher tuple.

    Returns ``(pairs, total)``; ``pairs`` is ``None`` when no tuple has a finite
    total. ``itertools.combinations`` yields tuples in lexicographic order and
    only a strictly smaller total replaces the best, so ties go to the
    lexicographically smallest teacher sequence.
    """
    import itertools

    cost = np.asarray(cost, dtype=np.float64)
    n_s, n_t = cost.shape
    rows = list(range(n_s)) if student_layers is None else list(student_layers)
    best, best_total = None, np.inf
    for teachers in itertools.combinations(range(n_t), len(rows)):
        total = 0.0
        for r, t in zip(rows, teachers, strict=True):
            total += cost[r, t]
        if total < best_total:
            best, best_total = list(zip(rows, teachers, strict=True)), total
    return best, best_total


# --- pkd/kernels/mse.py and pkd/kernels/normalized.py -------------------------------------


def mse_compact(y, teacher, teacher_rows, grad_scale):
    """Twin of mse_compact: returns (G, row_loss) instead of writing in place."""
    grad = np.empty_like(y)
    row_loss = np.zeros(y.shape[0])
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            r = y[i, j] - teacher[teacher_rows[i], j]
            row_loss[i] += float(r) * float(r)
            grad[i, j] = grad_scale * r
    return grad, row_loss


def mse_direct(student, teacher, rows, grad_scale):
    """Twin of mse_direct: returns (grad on the selected rows, zeros elsewhere; row_loss)."""
    grad = np.zeros_like(student)
    row_loss = np.zeros(len(rows))
    for k, i in enumerate(rows):
        for j in range(student.shape[1]):
            r = student[i, j] - teacher[i, j]
            row_loss[k] += float(r) * float(r)
            grad[i, j] = grad_scale * r
    return grad, row_loss


def scatter_rows(values, rows, out, accumulate):
    """Twin of ``pkd.kernels.rows.scatter_rows``: returns the new ``out`` (a copy)."""
    result = out.copy()
    if not accumulate:
        result[:] = 0
    for k, i in enumerate(rows):
        for j in range(out.shape[1]):
            result[i, j] = result[i, j] + values[k, j] if accumulate else values[k, j]
    return result


def normalized_row(y_row, t_row, grad_scale, eps=1e-12):
    """Twin of the normalized row: (‖u − v‖², grad_scale·∂/∂y) with math on Python floats."""
    y = [float(v) for v in y_row]
    t = [float(v) for v in t_row]
    y_norm = sum(v * v for v in y) ** 0.5
    t_norm = sum(v * v for v in t) ** 0.5
    u = [v / max(y_norm, eps) for v in y]
    v = [x / max(t_norm, eps) for x in t]
    loss = sum((a - b) ** 2 for a, b in zip(u, v, strict=True))
    cosine = sum(a * b for a, b in zip(u, v, strict=True))
    if y_norm > eps:
        grad = [grad_scale * (cosine * a - b) / y_norm for a, b in zip(u, v, strict=True)]
    else:
        grad = [grad_scale * (a - b) / eps for a, b in zip(u, v, strict=True)]
    return loss, np.array(grad)


# --- pkd/kernels/softmax.py -----------------------------------------------------------------


def logit_loss_grad(student, teacher, labels, tau, ce_coef, kd_coef):
    """Twin of logit_loss_grad: returns (grad, ce_rows, kl_rows), one example at a time.

    Math on Python floats: log_softmax(x)_c = x_c − m − log Σ_k exp(x_k − m), m = max x.
    """
    import math

    def log_softmax(values):
        m = max(values)
        log_sum = math.log(sum(math.exp(v - m) for v in values))
        return [v - m - log_sum for v in values]

    grad = np.empty_like(student)
    ce_rows = np.zeros(student.shape[0])
    kl_rows = np.zeros(student.shape[0])
    for i in range(student.shape[0]):
        z_s = [float(v) for v in student[i]]
        z_t = [float(v) for v in teacher[i]]
        log_p = log_softmax(z_s)
        log_p_s = log_softmax([v / tau for v in z_s])
        log_p_t = log_softmax([v / tau for v in z_t])
        ce_rows[i] = -log_p[labels[i]]
        for c in range(len(z_s)):
            p_t = math.exp(log_p_t[c])
            if p_t > 0:
                kl_rows[i] += p_t * (log_p_t[c] - log_p_s[c])
            onehot = 1.0 if c == labels[i] else 0.0
            grad[i, c] = (ce_coef * (math.exp(log_p[c]) - onehot)
                          + kd_coef * (math.exp(log_p_s[c]) - p_t))
    return grad, ce_rows, kl_rows


def fill_shifted_transposed(values, rows, shift, out, column_sums, row_squares):
    """Twin of ``pkd.kernels.gram.fill_shifted_transposed``: gather, shift, transpose, sum."""
    for j in range(values.shape[1]):
        total = 0.0
        for i, r in enumerate(rows):
            out[j, i] = float(values[r, j]) - shift[j]
            total += out[j, i]
        column_sums[j] += total
    for i in range(len(rows)):
        row_squares[i] = sum(out[j, i] ** 2 for j in range(values.shape[1]))


def centred_gram_square_norm(upper, column_sums, n):
    """Twin of ``pkd.kernels.gram.centred_gram_square_norm``: ``Σ_ij (G'_ij − a_i a_j/n)²``."""
    d = len(column_sums)
    total = 0.0
    for i in range(d):
        for j in range(d):
            g = upper[min(i, j), max(i, j)]
            total += (g - column_sums[i] * column_sums[j] / n) ** 2
    return total


def centred_cross_row_squares(cross, student_sums, teacher_centre, teacher_offsets, out):
    """Twin of ``pkd.kernels.gram.centred_cross_row_squares_*``: one row, one layer at a time."""
    for i in range(cross.shape[0]):
        for t in range(len(teacher_offsets) - 1):
            out[i, t] = sum((cross[i, j] + student_sums[i] * teacher_centre[j]) ** 2
                            for j in range(teacher_offsets[t], teacher_offsets[t + 1]))


# --- pkd/kernels/rbf.py: packed strict lower triangles, row by row ------------------------


def _packed_index(i, j):
    """Position of entry (i, j), j < i, in a packed strict lower triangle."""
    return i * (i - 1) // 2 + j


def squared_distances(gram, norms):
    """Twin of squared_distances: returns the packed D_ij = max(G_ii + G_jj − 2 G_ij, 0)."""
    n = gram.shape[0]
    out = np.zeros(n * (n - 1) // 2)
    for i in range(n):
        for j in range(i):
            out[_packed_index(i, j)] = max(norms[i] + norms[j] - 2.0 * gram[i, j], 0.0)
    return out


def rbf_row_sums(packed, n, denominator):
    """Twin of pkd._rbf_workspace.kernel_values: (packed kernel values, full matrix's row sums)."""
    import math

    kernel = np.array([math.exp(-float(v) / denominator) for v in packed])
    return kernel, row_sums(kernel, n)


def row_sums(packed, n):
    """Row sums of the full symmetric matrix of ``packed`` with a unit diagonal."""
    sums = np.zeros(n)
    for i in range(n):
        for j in range(n):
            sums[i] += 1.0 if i == j else packed[_packed_index(max(i, j), min(i, j))]
    return sums


def block_row_sums(packed, n, block, block_rows):
    """Twin of rbf.block_row_sums: (lower row sums of the block's rows, its column sums)."""
    rows = range(block * block_rows, min(n, (block + 1) * block_rows))
    lower = {i: sum(float(packed[_packed_index(i, j)]) for j in range(i)) for i in rows}
    columns = np.zeros(n)
    for i in rows:
        for j in range(i):
            columns[j] += packed[_packed_index(i, j)]
    return lower, columns


def centre_packed(packed, n, row_means, grand_mean, diagonal):
    """Twin of rbf._centre_row on every row: (packed K_ij − μ_i − μ_j + μ̄, centred diagonal)."""
    out = np.array(packed, dtype=np.float64)
    for i in range(n):
        for j in range(i):
            out[_packed_index(i, j)] = packed[_packed_index(i, j)] - row_means[i] \
                - row_means[j] + grand_mean
    centred_diagonal = np.array([diagonal[i] - 2.0 * row_means[i] + grand_mean
                                 for i in range(n)])
    return out, centred_diagonal


def packed_inner_products(stack, stack_diagonal, vector, vector_diagonal):
    """Twin of packed_inner_products: ⟨A_k, B⟩_F summed over the full symmetric matrices."""
    out = np.zeros(stack.shape[0])
    for k in range(stack.shape[0]):
        total = 0.0
        for e in range(vector.shape[0]):
            total += 2.0 * float(stack[k, e]) * float(vector[e])  # entries (i, j) and (j, i)
        for i in range(vector_diagonal.shape[0]):
            total += float(stack_diagonal[k, i]) * float(vector_diagonal[i])
        out[k] = total
    return out


def histogram_slot(value, lo, hi, n_bins):
    """Twin of rbf._slot: 0 below lo, n_bins + 1 at or above hi, else 1 + the bin."""
    if value < lo:
        return 0
    if value >= hi:
        return n_bins + 1
    return 1 + min(int((value - lo) * (n_bins / (hi - lo))), n_bins - 1)


def row_groups(n, n_groups):
    """Twin of rbf._group_pairs: the rows of each group (pair h is rows h and n − 1 − h)."""
    half = (n + 1) // 2
    per = (half + n_groups - 1) // n_groups
    return [sorted({i for h in range(g * per, min(half, (g + 1) * per)) for i in (h, n - 1 - h)})
            for g in range(n_groups)]


def histogram(packed, n, lo, hi, n_groups, n_bins):
    """Twin of rbf.histogram (and of squared_distances' counts): counts per group and slot."""
    counts = np.zeros((n_groups, n_bins + 2), dtype=np.int64)
    for g, rows in enumerate(row_groups(n, n_groups)):
        for i in rows:
            for j in range(i):
                counts[g, histogram_slot(packed[_packed_index(i, j)], lo, hi, n_bins)] += 1
    return counts


def gather(packed, n, lo, hi, first_slot, last_slot, n_groups, n_bins):
    """Twin of rbf.gather: the entries in slots first..last, group by group, rows in order."""
    out = []
    for rows in row_groups(n, n_groups):
        for i in sorted(rows, key=lambda r: (min(r, n - 1 - r), r != min(r, n - 1 - r))):
            for j in range(i):
                value = packed[_packed_index(i, j)]
                if first_slot <= histogram_slot(value, lo, hi, n_bins) <= last_slot:
                    out.append(value)
    return np.array(out)


def bracket_entries(packed, n, lo, hi, n_groups):
    """Twin of the counts and the copies of rbf.squared_distances and rbf.gather_window.

    Returns ``(below, inside)``: per group, the count of entries below ``lo`` and the list
    of entries in ``[lo, hi)``, rows in the kernels' order (h, n − 1 − h, h + 1, …).
    """
    below, inside = np.zeros(n_groups, dtype=np.int64), []
    for g, rows in enumerate(row_groups(n, n_groups)):
        entries = []
        for i in sorted(rows, key=lambda r: (min(r, n - 1 - r), r != min(r, n - 1 - r))):
            for j in range(i):
                value = packed[_packed_index(i, j)]
                below[g] += value < lo
                if lo <= value < hi:
                    entries.append(value)
        inside.append(entries)
    return below, inside
