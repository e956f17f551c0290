"""Plain float64 NumPy versions of every formula in DESIGN.md §1, written for reading.

Nothing here is fast or clever: each function is the formula, line by line,
so that the tests have an independent witness for the kernels.
"""

import numpy as np

EPS = 1e-12


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
