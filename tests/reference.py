"""Plain float64 NumPy versions of every formula in docs/math.md, written for reading.

Nothing here is fast or clever: each function is the formula, line by line,
so that the tests have an independent witness for the kernels.
"""

import numpy as np

EPS = 1e-12  # written out, not imported from pkd: the witness shares no code with the kernels


def effective_rank(P):
    """exp of the Shannon entropy (natural log) of p = σ / Σσ; zero σ contribute 0."""
    sigma = np.linalg.svd(np.asarray(P, dtype=np.float64), compute_uv=False)
    p = sigma / sigma.sum()
    entropy = 0.0
    for p_i in p:
        if p_i > 0:
            entropy -= p_i * np.log(p_i)
    return np.exp(entropy)


def stable_rank(P):
    """‖P‖_F² / σ₁²."""
    P = np.asarray(P, dtype=np.float64)
    sigma = np.linalg.svd(P, compute_uv=False)
    return np.sum(P * P) / sigma.max() ** 2


def mp_edges(d_s, d_t):
    """Marchenko–Pastur edges of a Xavier init: s·(√M ∓ √m), s² = 2/(d_s + d_t)."""
    m, M = min(d_s, d_t), max(d_s, d_t)
    s = np.sqrt(2.0 / (d_s + d_t))
    return s * (np.sqrt(M) - np.sqrt(m)), s * (np.sqrt(M) + np.sqrt(m))


# --- projected MSE and normalized loss (one pair) -----------------------------------------


def projected_mse(S, T, P=None, w=None):
    """ℓ = Σ_i w_i ‖y_i − t_i‖² / (n_w d_t), Y = S P; returns (ℓ, ∂ℓ/∂S, ∂ℓ/∂P)."""
    S = np.asarray(S, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    w = np.ones(S.shape[0]) if w is None else np.asarray(w, dtype=np.float64)
    Y = S if P is None else S @ np.asarray(P, dtype=np.float64)
    n_w, d_t = w.sum(), T.shape[1]
    R = Y - T
    loss = np.sum(w * np.sum(R**2, axis=1)) / (n_w * d_t)
    G = 2.0 * w[:, None] * R / (n_w * d_t)
    if P is None:
        return loss, G, None
    return loss, G @ np.asarray(P, dtype=np.float64).T, S.T @ G


def normalized_loss(S, T, P=None, w=None):
    """ℓ = Σ_i w_i ‖u_i − v_i‖² / n_w on L2-normalised rows; returns (ℓ, ∂ℓ/∂S, ∂ℓ/∂P)."""
    S = np.asarray(S, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    w = np.ones(S.shape[0]) if w is None else np.asarray(w, dtype=np.float64)
    Y = S if P is None else S @ np.asarray(P, dtype=np.float64)
    n_w = w.sum()
    y_norm = np.linalg.norm(Y, axis=1, keepdims=True)
    U = Y / np.maximum(y_norm, EPS)
    V = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), EPS)
    loss = np.sum(w * np.sum((U - V) ** 2, axis=1)) / n_w
    cosine = np.sum(U * V, axis=1, keepdims=True)
    big = y_norm > EPS
    G = np.where(big, (cosine * U - V) / np.where(big, y_norm, 1.0), (U - V) / EPS)
    G = 2.0 * w[:, None] * G / n_w
    if P is None:
        return loss, G, None
    return loss, G @ np.asarray(P, dtype=np.float64).T, S.T @ G


def hidden_loss(student_layers, teacher_layers, mapping, projection=None, *, hidden_weight=1.0,
                layer_weights=None, normalize=False, project="auto", w=None):
    """L_hidden = λ Σ ω_k ℓ_k / Σ ω_k on 2-D layers; returns (L, layer_losses, dS list, dP).

    ``projection`` is None, one matrix (shared) or a dict {pair: matrix}.
    """
    pair_loss = normalized_loss if normalize else projected_mse
    omega = np.ones(len(mapping)) if layer_weights is None else np.asarray(layer_weights, float)
    grads_s = [None] * len(student_layers)
    grad_p = None
    if isinstance(projection, dict):
        grad_p = {pair: np.zeros(p.shape) for pair, p in projection.items()}
    elif projection is not None:
        grad_p = np.zeros(projection.shape)
    total, losses = 0.0, []
    for k, (s, t) in enumerate(mapping):
        S, T = student_layers[s], teacher_layers[t]
        P = projection[(s, t)] if isinstance(projection, dict) else projection
        if P is not None and project == "auto" and S.shape[1] == T.shape[1]:
            P = None
        loss, dS, dP = pair_loss(S, T, P, w)
        coef = hidden_weight * omega[k] / omega.sum()
        losses.append(loss)
        total += coef * loss
        grads_s[s] = coef * dS if grads_s[s] is None else grads_s[s] + coef * dS
        if dP is not None:
            if isinstance(grad_p, dict):
                grad_p[(s, t)] += coef * dP
            else:
                grad_p += coef * dP
    return total, np.array(losses), grads_s, grad_p


# --- full PKD objective (logit part) ---------------------------------------------------


def reference_log_softmax(z):
    """log softmax of each row: z − max − log Σ exp(z − max) (max-shifted, so stable)."""
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def reference_cross_entropy(z_s, labels):
    """CE = mean_i −log softmax(z_s,i)[y_i]."""
    log_p = reference_log_softmax(z_s)
    return -np.mean(log_p[np.arange(len(labels)), labels])


def reference_kd_kl(z_s, z_t, tau):
    """KL = mean_i Σ_c p_t (log p_t − log p_s), p = softmax(z/τ); p_t = 0 terms are 0."""
    log_p_s = reference_log_softmax(np.asarray(z_s, dtype=np.float64) / tau)
    log_p_t = reference_log_softmax(np.asarray(z_t, dtype=np.float64) / tau)
    p_t = np.exp(log_p_t)
    terms = np.zeros_like(p_t)
    mass = p_t > 0
    terms[mass] = p_t[mass] * (log_p_t[mass] - log_p_s[mass])
    return terms.sum(axis=1).mean()


def reference_logit_grad(z_s, z_t, labels, alpha, tau):
    """∂L/∂z_s = (1 − α)(softmax(z_s) − onehot(y))/B + α τ (softmax(z_s/τ) − softmax(z_t/τ))/B."""
    z_s = np.asarray(z_s, dtype=np.float64)
    B, C = z_s.shape
    onehot = np.eye(C)[labels]
    p = np.exp(reference_log_softmax(z_s))
    p_s = np.exp(reference_log_softmax(z_s / tau))
    p_t = np.exp(reference_log_softmax(np.asarray(z_t, dtype=np.float64) / tau))
    return (1 - alpha) * (p - onehot) / B + alpha * tau * (p_s - p_t) / B


# --- alignment statistics (docs/math.md, "Alignment statistics") -------------------------


def reference_gram_stats(student_layers, teacher_layers, w=None):
    """G_s = SᵀWS, H_t = TᵀWT, C_st = SᵀWT, a_s = Sᵀw, b_t = Tᵀw, q_t = Σ w‖t‖², n_w.

    Layers are (N, d) arrays; returns a dict of lists (``C`` is a list of lists [s][t]).
    """
    S = [np.asarray(x, dtype=np.float64) for x in student_layers]
    T = [np.asarray(x, dtype=np.float64) for x in teacher_layers]
    w = np.ones(S[0].shape[0]) if w is None else np.asarray(w, dtype=np.float64)
    return {
        "G": [x.T @ (w[:, None] * x) for x in S],
        "H": [y.T @ (w[:, None] * y) for y in T],
        "C": [[x.T @ (w[:, None] * y) for y in T] for x in S],
        "a": [x.T @ w for x in S],
        "b": [y.T @ w for y in T],
        "q": [np.sum(w * np.sum(y * y, axis=1)) for y in T],
        "n_w": w.sum(),
    }


def reference_cka(S, T, w=None):
    """Linear CKA ‖ŜᵀWT̂‖_F² / (‖ŜᵀWŜ‖_F ‖T̂ᵀWT̂‖_F) with explicitly centred float64 rows."""
    S = np.asarray(S, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    w = np.ones(S.shape[0]) if w is None else np.asarray(w, dtype=np.float64)
    S_c = S - (w @ S) / w.sum()
    T_c = T - (w @ T) / w.sum()
    cross = S_c.T @ (w[:, None] * T_c)
    gram_s = S_c.T @ (w[:, None] * S_c)
    gram_t = T_c.T @ (w[:, None] * T_c)
    return np.sum(cross**2) / (np.linalg.norm(gram_s) * np.linalg.norm(gram_t))


def reference_min_mse(S, T, w=None):
    """min_P Σ w_i ‖Pᵀs_i − t_i‖² / (n_w d_t) by numpy.linalg.lstsq(rcond=None) on √w-scaled rows.

    Returns ``(min_mse, P)``; ``P`` is the minimum-norm solution, and the MSE is
    computed from the residual rows directly.
    """
    S = np.asarray(S, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    w = np.ones(S.shape[0]) if w is None else np.asarray(w, dtype=np.float64)
    root = np.sqrt(w)[:, None]
    P = np.linalg.lstsq(root * S, root * T, rcond=None)[0]
    residual = S @ P - T
    return np.sum(w * np.sum(residual**2, axis=1)) / (w.sum() * T.shape[1]), P


# --- central finite differences (the second witness of every gradient) -------------------


def central_difference(loss, array, index, eps=1e-6):
    """(loss(x + eps·e_index) − loss(x − eps·e_index)) / (2 eps), perturbing ``array`` in place."""
    saved = array[index]
    array[index] = saved + eps
    up = loss()
    array[index] = saved - eps
    down = loss()
    array[index] = saved
    return (up - down) / (2 * eps)


def finite_difference(loss, array, eps=1e-6):
    """Central differences of ``loss()`` with respect to every entry of ``array``."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        grad[index] = central_difference(loss, array, index, eps)
    return grad


# --- debiased CKA and held-out fits (tests of AlignmentStats' folds and fourth moments) ---


def reference_unbiased_hsic(K, L):
    """Song et al. (2012)'s unbiased HSIC of two n × n kernel matrices, n >= 4, O(n²).

    With K̃, L̃ the kernels with zeroed diagonals:
    [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)).
    """
    K = np.array(K, dtype=np.float64)
    L = np.array(L, dtype=np.float64)
    n = K.shape[0]
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    ones = np.ones(n)
    trace = np.sum(K * L.T)
    totals = (ones @ K @ ones) * (ones @ L @ ones) / ((n - 1) * (n - 2))
    middle = 2.0 / (n - 2) * (ones @ K @ L @ ones)
    return (trace + totals - middle) / (n * (n - 3))


def reference_debiased_cka(X, Y, w=None):
    """Debiased linear CKA: unbiased HSIC of the linear kernels of the rows ``w`` keeps."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if w is not None:
        keep = np.asarray(w) > 0
        X, Y = X[keep], Y[keep]
    K, L = X @ X.T, Y @ Y.T
    return reference_unbiased_hsic(K, L) / np.sqrt(
        reference_unbiased_hsic(K, K) * reference_unbiased_hsic(L, L))


def reference_heldout_mse(S, T, train, rcond=1e-6):
    """Fit ``P`` by lstsq(rcond) on the ``train`` rows, return its MSE on the other rows."""
    S = np.asarray(S, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    train = np.asarray(train, dtype=bool)
    P = np.linalg.lstsq(S[train], T[train], rcond=rcond)[0]
    return np.mean((S[~train] @ P - T[~train]) ** 2)
