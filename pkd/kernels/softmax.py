"""Fused pass of the logit part of the PKD objective: CE, KL and ∂/∂z_s in one sweep.

Per example row i (docs/math.md), with student logits ``z_s``, teacher
logits ``z_t``, label ``y`` and temperature τ::

    log p   = log_softmax(z_s)          CE_i = −log p[y]
    log p_s = log_softmax(z_s / τ)      KL_i = Σ_c p_t,c (log p_t,c − log p_s,c)
    log p_t = log_softmax(z_t / τ)
    g_c     = ce_coef · (p_c − [c = y]) + kd_coef · (p_s,c − p_t,c)

The caller passes ``ce_coef = (1 − α)/B`` and ``kd_coef = α τ / B`` so that
``g`` is the row of ∂L/∂z_s.

Stability: each log-softmax subtracts the row maximum before exponentiating
and takes the log-sum-exp in float64, and ``(z − max)/τ`` is formed in
float64 from the max-shifted logit, so logits of magnitude 1e4 (or more) give
finite results in float32 as well as float64. Entries with ``p_t = 0``
(underflow, or a teacher logit of −inf) contribute ``0 · log 0 = 0`` to the
KL. A logit of −inf is an exact zero probability; the Python layer refuses
NaN, +inf and rows with no finite logit, and reports an infinite CE or KL
(a −inf student logit where the label or the teacher puts mass).

Confident students are the common case late in training, so the label's
terms avoid cancellation: ``p_y − 1`` is computed as ``−Σ_{c≠y} e_c / Σ_c e_c``
and CE as ``log1p(Σ_{c≠y} e_c / e_y)`` when ``e_y ≥ 1/2`` (``e`` the
max-shifted exponentials); a CE of 1e-13 and its gradient keep full
relative precision.

Each row reads its logits three times (max; exponentials; probabilities and
gradient) and takes three ``exp`` per logit, kept in a float64 scratch row
the caller allocates (one per chunk of rows). Each row's CE and KL go into
float64 partials; the caller sums them in a fixed order, so the loss does not
depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import kernel, twins


@kernel
def _logit_row(z_s, z_t, label, inv_tau, ce_coef, kd_coef, out_row, scratch):
    """One example: returns (CE_i, KL_i) and writes the gradient row into ``out_row``.

    z_s, z_t, out_row : (C,) arrays; label : int; inv_tau, ce_coef, kd_coef : float64;
    scratch : (3, C) float64, overwritten (the exponentials, so each is taken once).
    """
    n_classes = z_s.shape[0]
    exp_plain = scratch[0]
    exp_s = scratch[1]
    exp_t = scratch[2]
    max_s = -np.inf
    max_t = -np.inf
    for c in range(n_classes):
        max_s = max(max_s, np.float64(z_s[c]))
        max_t = max(max_t, np.float64(z_t[c]))
    # Exponentials of max-shifted logits: all in [0, 1], the largest is exactly 1.
    sum_plain = 0.0
    sum_others = 0.0  # Σ over c ≠ y: 1 − p_y without cancellation when p_y ≈ 1
    sum_s = 0.0
    sum_t = 0.0
    for c in range(n_classes):
        shifted_s = np.float64(z_s[c]) - max_s
        shifted_t = np.float64(z_t[c]) - max_t
        exp_plain[c] = math.exp(shifted_s)
        exp_s[c] = math.exp(shifted_s * inv_tau)
        exp_t[c] = math.exp(shifted_t * inv_tau)
        sum_plain += exp_plain[c]
        if c != label:
            sum_others += exp_plain[c]
        sum_s += exp_s[c]
        sum_t += exp_t[c]
    inv_plain = 1.0 / sum_plain
    inv_s = 1.0 / sum_s
    inv_t = 1.0 / sum_t
    # log p_t − log p_s = (shifted_t − shifted_s)/τ − log Σ_t + log Σ_s
    log_ratio_offset = math.log(sum_s) - math.log(sum_t)

    kl = 0.0
    for c in range(n_classes):
        p_s = exp_s[c] * inv_s
        p_t = exp_t[c] * inv_t
        if p_t > 0.0:  # 0 · log 0 = 0, also when log p_s = −inf
            shifted_s = np.float64(z_s[c]) - max_s
            shifted_t = np.float64(z_t[c]) - max_t
            kl += p_t * ((shifted_t - shifted_s) * inv_tau + log_ratio_offset)
        if c == label:
            g = ce_coef * (-sum_others * inv_plain)  # p_y − 1
        else:
            g = ce_coef * (exp_plain[c] * inv_plain)
        out_row[c] = g + kd_coef * (p_s - p_t)
    # CE = −log p_y = log(Σ/e_y). For a confident student (e_y near 1) take
    # log1p(Σ_others/e_y), so a CE of 1e-13 keeps its digits; else CE > log 2
    # and the plain form loses nothing.
    exp_label = exp_plain[label]
    if exp_label >= 0.5:
        ce = math.log1p(sum_others / exp_label)
    else:
        ce = math.log(sum_plain) - (np.float64(z_s[label]) - max_s)
    return ce, kl


def _logit_loss_grad(student, teacher, labels, inv_tau, ce_coef, kd_coef, grad,
                     ce_rows, kl_rows, scratch):
    """All examples: per-row CE and KL partials, and ∂L/∂z_s into ``grad``.

    student, teacher, grad : (B, C), one float dtype; labels : (B,) int64 in [0, C);
    inv_tau, ce_coef, kd_coef : float64; ce_rows, kl_rows : (B,) float64, receive CE_i
    and KL_i; scratch : (n_chunks, 3, C) float64. Rows are split into n_chunks
    contiguous chunks (one per thread in the parallel twin), each with its own
    scratch; every row's result is independent of the chunking.
    """
    n_examples = student.shape[0]
    n_chunks = scratch.shape[0]
    for chunk in prange(n_chunks):
        buffer = scratch[chunk]
        for i in range(chunk * n_examples // n_chunks, (chunk + 1) * n_examples // n_chunks):
            ce, kl = _logit_row(student[i], teacher[i], labels[i], inv_tau, ce_coef, kd_coef,
                                grad[i], buffer)
            ce_rows[i] = ce
            kl_rows[i] = kl


logit_loss_grad_serial, logit_loss_grad_parallel = twins(_logit_loss_grad)
