"""``pkd bench``: speed as ratios measured in one process.

For every case (variant × dtype × N × (d_s, d_t)) each contender runs once to
warm up and then ``repeats`` times (more when a case is fast, so that each
round of runs lasts ``_MIN_ROUND_S``): pkd and the GEMMs interleaved call by
call (so a burst of machine noise hits them alike), the NumPy and torch
versions in blocks of their own, the blocks alternated in rounds (see
``_median_times``); the figure kept is the median.
Contenders:

- ``pkd``: the call being measured (loss and every gradient);
- ``gemm``: the GEMMs the computation cannot avoid, alone, into preallocated
  outputs in the same BLAS (for the projected loss: S·P, Sᵀ·G, G·Pᵀ over all N
  rows): the physical limit;
- ``numpy``: the plain NumPy version a user would write, in the input dtype;
- ``torch``: torch CPU autograd of the same loss (when torch is installed);
- ``torch_gemm``: the same GEMMs as ``gemm`` in torch's own BLAS, timed with
  ``torch`` (the "torch BLAS" column is their ratio to ``gemm``): torch's x86
  wheels bring MKL, and where it is faster than numpy's OpenBLAS a torch
  speed-up below 1 is the BLAS library's, not the fused computation's.

With torch installed two more variants time pkd's bridge against torch's own
autograd: ``torch bridge`` (``pkd.torch.projected_mse``, one pair) and
``torch module`` (``pkd.torch.PKDHiddenLoss`` over 4 pairs sharing P, against
four torch calls), both forward + backward.

Peak extra memory of the pkd call is measured with ``tracemalloc`` (NumPy
reports its buffers to it) in a separate, untimed call whose gradients are
allocated anew (see ``_peak_bytes``), and compared with the budget
``1.2 × (one N×d_t buffer + the gradient outputs)``.

Two workloads of fixed size follow the grid (``--variant`` selects them by
name; ``--quick`` runs them smaller): ``rbf cka`` (:func:`bench_rbf_cka`, RBF
CKA of 4,096 rows: the Numba passes' parallel and serial twins, the plain
NumPy version, and its GEMMs alone) and ``layer analysis``
(:func:`bench_layer_analysis`, the all-pairs analysis of 7 × 13 layers of
3,000 rows against its GEMMs alone and per-pair ``numpy.linalg.lstsq``) and
``dump`` (:func:`bench_dump`, ``pkd.hf.dump_hidden_states`` on a tiny BERT
built from a config: pkd's own work as a share of the model's forward, and
peak memory for two numbers of texts; it needs transformers and torch).

After them, :func:`call_overhead` measures the fixed cost of a call on
inputs of a few rows (the Python around the GEMMs, which weighs on the
sub-millisecond cases) and :func:`startup_times` the start-up costs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GRID_N = (256, 512, 4096, 16384)
GRID_SHAPES = ((128, 256), (312, 768), (384, 768), (768, 768))
GRID_VARIANTS = ("plain", "masked", "normalized+masked", "4 pairs shared", "alignment",
                 "torch bridge", "torch module")
# Workloads of fixed size, run after the grid (smaller with --quick): see bench_rbf_cka
# and bench_layer_analysis.
WORKLOADS = ("rbf cka", "layer analysis", "dump")
VARIANTS = GRID_VARIANTS + WORKLOADS
TORCH_VARIANTS = ("torch bridge", "torch module")
# --quick: one small and one large case per variant, float32 (under a minute here).
QUICK_CASES = ((512, 384, 768), (4096, 128, 256))
KEEP_FRACTION = 0.8


@dataclass
class Row:
    variant: str
    dtype: str
    n_rows: int
    d_s: int
    d_t: int
    pkd_ms: float
    gemm_ms: float
    numpy_ms: float | None
    torch_ms: float | None
    peak_mb: float | None
    budget_mb: float | None
    # The same GEMMs in torch's BLAS (MKL on x86 wheels): how much of a torch
    # speed-up is the BLAS library's and not the rest of the computation.
    torch_gemm_ms: float | None = None

    @property
    def vs_gemm(self) -> float:
        return self.pkd_ms / self.gemm_ms

    @property
    def torch_blas(self) -> float | None:
        """torch's GEMMs / numpy's: below 1 where torch's BLAS is the faster one."""
        return None if self.torch_gemm_ms is None else self.torch_gemm_ms / self.gemm_ms

    def speedup(self, other: float | None) -> float | None:
        return None if other is None else other / self.pkd_ms


def _cpuinfo_fields(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} elsewhere)."""
    fields: dict = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cache_sizes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict:
    """Data and unified cache sizes of CPU 0 by level, e.g. {"L1d": "48K", "L2": "2048K"}."""
    sizes = {}
    try:
        for index in sorted(os.listdir(root)):
            level, kind, size = (Path(root, index, name).read_text().strip()
                                 for name in ("level", "type", "size"))
            if kind != "Instruction":
                sizes[f"L{level}" + ("d" if kind == "Data" else "")] = size
    except OSError:
        pass
    return sizes


def machine_header() -> dict:
    """CPU, threads (Numba and BLAS) and library versions."""
    import numba
    from threadpoolctl import threadpool_info

    fields = _cpuinfo_fields()
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    # Family and model too: CPUs sold under one model name differ.
    model = (f"family {fields['cpu family']}, model {fields['model']}"
             if "cpu family" in fields and "model" in fields else None)
    blas = [
        {k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture",
                                  "threading_layer")}
        for info in threadpool_info() if info.get("user_api") == "blas"
    ]
    header = {
        "cpu": cpu,
        "cpu_model": model,
        "caches": _cache_sizes(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "blas": blas,
    }
    try:
        import torch

        header["torch"] = torch.__version__
        header["torch_threads"] = torch.get_num_threads()
    except ImportError:
        header["torch"] = None
    return header


def _median_times(groups: list[dict[str, Callable | None]], repeats: int,
                  rounds: int | None = None) -> dict[str, float]:
    """Median seconds of every contender.

    Contenders within a group are timed round-robin, so a burst of machine
    noise hits them alike: pkd and the GEMMs alone, which share numpy's
    OpenBLAS. Groups that use another pool (torch's OpenMP threads, scipy's
    own OpenBLAS) are timed in their own block after a pause, since a pool
    still spinning after its last call starves the next one; the NumPy
    version gets its own block too, since its N×d_t temporaries flush the L2
    cache the GEMMs and pkd would otherwise share.

    The ``repeats`` runs are split into ``rounds`` (``ROUNDS`` by default) that
    alternate the groups (A B A B A B), so that the groups are not measured in
    two separate stretches of a machine whose speed drifts. Each round warms its
    contenders up after the pause (a first call wakes the pool), except those
    that take over 50 ms, for which waking up is noise-level.

    A round times a group for at least ``_MIN_ROUND_S`` (more runs than
    ``repeats`` asks for when the group is fast, at most ``_MAX_RUNS_PER_ROUND``):
    the first calls after the pause run on cold caches and a CPU that was idle,
    and with 2–3 runs per round they would be a third of the samples. The
    measurements behind each choice are in docs/performance.md ("How `pkd bench`
    times").
    """
    live_groups = [{name: fn for name, fn in group.items() if fn is not None}
                   for group in groups]
    live_groups = [group for group in live_groups if group]
    samples: dict[str, list[float]] = {name: [] for group in live_groups for name in group}
    rounds = max(1, min(ROUNDS if rounds is None else rounds, repeats))
    for r in range(rounds):
        runs = repeats // rounds + (r < repeats % rounds)
        for group in live_groups:
            time.sleep(_COOL_DOWN_S)
            start = time.perf_counter()
            for name, fn in group.items():
                if r == 0 or statistics.median(samples[name]) < _WARM_UP_BELOW_S:
                    fn()
            # One pass over the group: the warm-up in the first round, the medians after.
            per_pass = (time.perf_counter() - start if r == 0 else
                        sum(statistics.median(samples[name]) for name in group))
            for _ in range(_runs_per_round(runs, per_pass)):
                for name, fn in group.items():
                    start = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


_COOL_DOWN_S = 0.2
ROUNDS = 3
_WARM_UP_BELOW_S = 0.05
_MIN_ROUND_S = 0.05
_MAX_RUNS_PER_ROUND = 100


def _runs_per_round(runs: int, per_pass_s: float) -> int:
    """``runs``, raised so that a round lasts ``_MIN_ROUND_S`` (within the cap)."""
    if _MIN_ROUND_S <= 0:
        return runs
    wanted = math.ceil(_MIN_ROUND_S / per_pass_s) if per_pass_s > 0 else _MAX_RUNS_PER_ROUND
    return max(runs, min(wanted, _MAX_RUNS_PER_ROUND))


def _peak_bytes(fn: Callable) -> int:
    """Peak bytes traced during one call of ``fn``, its gradients allocated anew.

    The kept gradient blocks are released first (``pkd.workspace.Workspace``): a
    call that reuses one allocates nothing for its gradients, and the budget
    counts them. The scratch buffers stay, as between the calls of a loop.
    """
    from .workspace import thread_workspace

    thread_workspace().release_gradient_blocks()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the cases ------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _case_arrays(n, d_s, d_t, dtype, n_layers=1, seed=0):
    rng = np.random.default_rng(seed)
    student = [rng.standard_normal((n, d_s), dtype=np.float32).astype(dtype, copy=False)
               for _ in range(n_layers)]
    teacher = [rng.standard_normal((n, d_t), dtype=np.float32).astype(dtype, copy=False)
               for _ in range(n_layers)]
    bound = np.sqrt(6.0 / (d_s + d_t))
    projection = rng.uniform(-bound, bound, (d_s, d_t)).astype(dtype)
    mask = rng.random(n) < KEEP_FRACTION
    return student, teacher, projection, mask


def _gemms(student, projection, n_pairs=1, torch=None):
    """The three GEMMs of the projected loss, per pair, into preallocated outputs.

    In numpy's BLAS, or with ``torch`` (the module) in torch's, on tensors
    sharing the arrays' memory.
    """
    S = student[0]
    arrays = [*student[:n_pairs], projection,
              np.empty((S.shape[0], projection.shape[1]), dtype=S.dtype),
              np.empty_like(projection), np.empty_like(S)]
    matmul = np.matmul
    if torch is not None:
        arrays, matmul = [torch.from_numpy(a) for a in arrays], torch.matmul
    *layers, P, y, grad_p, grad_s = arrays

    def run():
        for layer in layers:
            matmul(layer, P, out=y)
            matmul(layer.T, y, out=grad_p)
            matmul(y, P.T, out=grad_s)

    return run


def _torch_gemms(torch, student, projection, n_pairs=1):
    """:func:`_gemms` in torch's BLAS, or ``None`` without torch."""
    return None if torch is None else _gemms(student, projection, n_pairs, torch=torch)


def _ms(times: dict, name: str) -> float | None:
    return times[name] * 1e3 if name in times else None


def _numpy_pair(S, T, P, w, normalize):
    """The plain NumPy version of one pair's loss and gradients, in the input dtype."""
    from .kernels.normalized import EPS

    Y = S @ P
    n_w = w.sum() if w is not None else S.shape[0]
    if normalize:
        y_norm = np.sqrt((Y * Y).sum(1, keepdims=True))
        U = Y / np.maximum(y_norm, EPS)
        V = T / np.maximum(np.sqrt((T * T).sum(1, keepdims=True)), EPS)
        per_row = ((U - V) ** 2).sum(1)
        cosine = (U * V).sum(1, keepdims=True)
        G = (cosine * U - V) / np.maximum(y_norm, EPS) * (2.0 / n_w)
    else:
        R = Y - T
        per_row = (R * R).sum(1) / T.shape[1]
        G = R * (2.0 / (n_w * T.shape[1]))
    if w is not None:
        per_row = per_row * w
        G = G * w[:, None]
    loss = per_row.sum() / n_w
    return loss, G @ P.T, S.T @ G


def _torch_pair(torch, S, T, P, w, normalize):
    s = torch.from_numpy(S).requires_grad_(True)
    p = torch.from_numpy(P).requires_grad_(True)
    t = torch.from_numpy(T)
    weights = None if w is None else torch.from_numpy(w.astype(S.dtype))

    def run():
        s.grad = p.grad = None
        y = s @ p
        if normalize:
            diff = (torch.nn.functional.normalize(y, dim=-1)
                    - torch.nn.functional.normalize(t, dim=-1))
            per_row = (diff * diff).sum(-1)
        else:
            per_row = ((y - t) ** 2).mean(-1)
        if weights is None:
            loss = per_row.mean()
        else:
            loss = (per_row * weights).sum() / weights.sum()
        loss.backward()
        return loss

    return run


def bench_case(variant, n, d_s, d_t, dtype, repeats) -> Row:
    """Measure one case; see the module docstring."""
    import pkd

    torch = _torch()
    dtype = np.dtype(dtype)
    n_pairs = 4 if variant in ("4 pairs shared", "torch module") else 1
    student, teacher, P, mask = _case_arrays(n, d_s, d_t, dtype, n_layers=n_pairs)
    S, T = student[0], teacher[0]
    masked = variant in ("masked", "normalized+masked")
    normalize = variant == "normalized+masked"
    w = mask.astype(dtype) if masked else None
    budget = (n * d_t + n * d_s * n_pairs + d_s * d_t) * dtype.itemsize * 1.2

    if variant == "alignment":
        return _bench_alignment(n, d_s, d_t, dtype, repeats)
    if variant == "torch bridge":
        return _bench_torch_bridge(torch, S, T, P, dtype, budget, repeats)
    if variant == "torch module":
        return _bench_torch_module(torch, student, teacher, P, dtype, budget, repeats)
    if variant == "4 pairs shared":
        # "always": with d_s == d_t the reference implementation's rule would skip it.
        cfg = pkd.ProgressiveDistillation([(k, k) for k in range(4)], projection=P,
                                          project="always")

        def ours():
            return cfg.loss_and_grad(student, teacher)

        def numpy_version():
            return [_numpy_pair(student[k], teacher[k], P, None, False) for k in range(4)]

        torch_version = None
        if torch is not None:
            runs = [_torch_pair(torch, student[k], teacher[k], P, None, False) for k in range(4)]

            def torch_version():
                for run in runs:
                    run()
    else:
        def ours():
            return pkd.projected_mse_grad(S, T, P, mask=mask if masked else None,
                                          normalize=normalize)

        def numpy_version():
            return _numpy_pair(S, T, P, w, normalize)

        torch_version = None if torch is None else _torch_pair(torch, S, T, P, w, normalize)

    times = _median_times([{"pkd": ours, "gemm": _gemms(student, P, n_pairs)},
                           {"numpy": numpy_version},
                           {"torch": torch_version,
                            "torch_gemm": _torch_gemms(torch, student, P, n_pairs)}], repeats)
    peak = _peak_bytes(ours)
    return Row(variant, dtype.name, n, d_s, d_t, times["pkd"] * 1e3, times["gemm"] * 1e3,
               times["numpy"] * 1e3, _ms(times, "torch"), peak / 2**20, budget / 2**20,
               _ms(times, "torch_gemm"))


def _bench_torch_bridge(torch, S, T, P, dtype, budget, repeats) -> Row:
    """``pkd.torch.projected_mse`` forward + backward vs torch's own, on the same tensors."""
    import pkd.torch as pkd_torch

    s = torch.from_numpy(S).requires_grad_(True)
    p = torch.from_numpy(P).requires_grad_(True)
    t = torch.from_numpy(T)

    def ours():
        s.grad = p.grad = None
        pkd_torch.projected_mse(s, t, p).backward()

    def numpy_version():
        return _numpy_pair(S, T, P, None, False)

    times = _median_times([{"pkd": ours, "gemm": _gemms([S], P)}, {"numpy": numpy_version},
                           {"torch": _torch_pair(torch, S, T, P, None, False),
                            "torch_gemm": _torch_gemms(torch, [S], P)}], repeats)
    n, d_s = S.shape
    return Row("torch bridge", dtype.name, n, d_s, T.shape[1], times["pkd"] * 1e3,
               times["gemm"] * 1e3, times["numpy"] * 1e3, times["torch"] * 1e3,
               _peak_bytes(ours) / 2**20, budget / 2**20, times["torch_gemm"] * 1e3)


def _bench_torch_module(torch, student, teacher, P, dtype, budget, repeats) -> Row:
    """``pkd.torch.PKDHiddenLoss`` over 4 pairs sharing P, forward + backward, vs 4 torch calls."""
    import pkd
    import pkd.torch as pkd_torch

    config = pkd.ProgressiveDistillation([(k, k) for k in range(4)], projection=P,
                                         project="always")
    criterion = pkd_torch.PKDHiddenLoss(config)
    s = [torch.from_numpy(a).requires_grad_(True) for a in student]
    t = [torch.from_numpy(a) for a in teacher]

    def ours():
        for layer in s:
            layer.grad = None
        criterion.projection.grad = None
        criterion(s, t).backward()

    def numpy_version():
        return [_numpy_pair(student[k], teacher[k], P, None, False) for k in range(4)]

    runs = [_torch_pair(torch, student[k], teacher[k], P, None, False) for k in range(4)]

    def torch_version():
        for run in runs:
            run()

    times = _median_times([{"pkd": ours, "gemm": _gemms(student, P, 4)},
                           {"numpy": numpy_version},
                           {"torch": torch_version,
                            "torch_gemm": _torch_gemms(torch, student, P, 4)}], repeats)
    n, d_s = student[0].shape
    return Row("torch module", dtype.name, n, d_s, teacher[0].shape[1], times["pkd"] * 1e3,
               times["gemm"] * 1e3, times["numpy"] * 1e3, times["torch"] * 1e3,
               _peak_bytes(ours) / 2**20, budget / 2**20, times["torch_gemm"] * 1e3)


def _layers_and_gemm_floor(n, n_s, n_t, d_s, d_t):
    """Random float32 layers, their float64 Fortran copies, and the statistics' GEMM floor.

    The floor is what the accumulation asks of BLAS: a float64 dsyrk per layer and
    one dgemm for every (student, teacher) cross block, in scipy's BLAS.
    """
    from scipy.linalg import blas

    rng = np.random.default_rng(0)
    student = [rng.standard_normal((n, d_s), dtype=np.float32) for _ in range(n_s)]
    teacher = [rng.standard_normal((n, d_t), dtype=np.float32) for _ in range(n_t)]
    s64 = [np.asfortranarray(a, dtype=np.float64) for a in student]
    t64 = [np.asfortranarray(a, dtype=np.float64) for a in teacher]
    all_s, all_t = np.asfortranarray(np.hstack(s64)), np.asfortranarray(np.hstack(t64))

    def gemms():
        for a in s64 + t64:
            blas.dsyrk(1.0, a, trans=1)
        blas.dgemm(1.0, all_s, all_t, trans_a=1)

    return student, teacher, s64, t64, gemms


def bench_alignment_matrix(n=20_000, n_s=6, n_t=12, d_s=384, d_t=768, repeats=3,
                           out=None) -> dict:
    """The layer-mapping workload: statistics of 6 × 12 layer pairs, then ``min_mse``.

    Reports the accumulation against its BLAS calls alone (float64 dsyrk per
    layer and one dgemm for every cross block, the calls the accumulation
    makes, in scipy's BLAS), and the ``min_mse`` matrix from the statistics
    against fitting each of the n_s·n_t pairs with ``scipy.linalg.lstsq``.
    """
    out = sys.stdout if out is None else out
    import scipy.linalg

    from .alignment import AlignmentStats

    student, teacher, s64, t64, gemms = _layers_and_gemm_floor(n, n_s, n_t, d_s, d_t)

    stats = AlignmentStats.from_arrays(student, teacher)

    def min_mse():
        stats._residual_cache.clear()  # time the solve, not a repeated query's cache hit
        return stats.min_mse()

    times = _median_times([{"accumulate": lambda: AlignmentStats.from_arrays(student, teacher),
                            "gemm": gemms, "min_mse": min_mse}], repeats)
    start = time.perf_counter()
    for S in student:
        for T in teacher:
            scipy.linalg.lstsq(S, T)
    lstsq_s = time.perf_counter() - start
    result = {"n_rows": n, "n_student": n_s, "n_teacher": n_t, "d_s": d_s, "d_t": d_t,
              "accumulate_s": times["accumulate"], "gemm_s": times["gemm"],
              "accumulate_vs_gemm": times["accumulate"] / times["gemm"],
              "min_mse_s": times["min_mse"], "lstsq_72_s": lstsq_s,
              "lstsq_vs_min_mse": lstsq_s / times["min_mse"]}
    print(f"\nalignment, {n_s}×{n_t} layers, N={n}, {d_s}→{d_t}, float32: accumulation "
          f"{result['accumulate_s']:.2f} s = {result['accumulate_vs_gemm']:.2f}× its float64 "
          f"GEMMs alone ({result['gemm_s']:.2f} s); min_mse matrix {result['min_mse_s']:.2f} s "
          f"vs {n_s * n_t} scipy.linalg.lstsq fits {lstsq_s:.1f} s "
          f"({result['lstsq_vs_min_mse']:.0f}× faster)", file=out)
    return result


def _bench_alignment(n, d_s, d_t, dtype, repeats) -> Row:
    """AlignmentStats accumulation (one student, one teacher layer) vs its GEMMs.

    The accumulation runs float64 BLAS (scipy's dsyrk for SᵀS and TᵀT, dgemm
    for SᵀT) on float64 copies of each chunk, for accuracy (see
    pkd/kernels/gram.py); its physical limit is those same three float64 calls
    on the whole data, in the same BLAS. The NumPy contender is what a user
    would write: cast to float64 and three matmuls.
    """
    from scipy.linalg import blas

    from .alignment import AlignmentStats

    student, teacher, _, _ = _case_arrays(n, d_s, d_t, dtype)
    S, T = student[0], teacher[0]
    S64, T64 = np.asfortranarray(S, dtype=np.float64), np.asfortranarray(T, dtype=np.float64)

    def gemms():
        blas.dsyrk(1.0, S64, trans=1)
        blas.dsyrk(1.0, T64, trans=1)
        blas.dgemm(1.0, S64, T64, trans_a=1)

    def ours():
        return AlignmentStats.from_arrays([S], [T])

    def numpy_version():
        s64, t64 = S.astype(np.float64), T.astype(np.float64)
        return s64.T @ s64, t64.T @ t64, s64.T @ t64, s64.sum(0), t64.sum(0)

    times = _median_times([{"pkd": ours, "gemm": gemms}, {"numpy": numpy_version}], repeats)
    return Row("alignment", np.dtype(dtype).name, n, d_s, d_t, times["pkd"] * 1e3,
               times["gemm"] * 1e3, times["numpy"] * 1e3, None, _peak_bytes(ours) / 2**20,
               None)


RBF_CKA_CASE = (4096, 384, 768)  # N, d_s, d_t
RBF_CKA_QUICK = (1024, 384, 768)


def _numpy_rbf_cka(X, Y, bandwidth=0.5) -> float:
    """RBF CKA as a user writes it in NumPy: full n × n float64 matrices (the authors' demo)."""
    def centred_kernel(A):
        A = A.astype(np.float64)
        gram = A @ A.T
        norms = np.diag(gram)
        distances = norms[:, None] + norms[None, :] - 2.0 * gram
        K = np.exp(-distances / (2.0 * bandwidth**2 * np.median(distances)))
        means = K.mean(axis=0)
        return K - means[:, None] - means[None, :] + means.mean()

    K, L = centred_kernel(X), centred_kernel(Y)
    return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))


def bench_rbf_cka(n=4096, d_s=384, d_t=768, repeats=5, out=None) -> dict:
    """RBF CKA of one pair, N rows (float32): the parallel twin vs the serial one, NumPy, GEMMs.

    ``gemm``, the floor: the two float64 ``X Xᵀ`` (scipy's dsyrk on all of
    OpenBLAS's threads, into a preallocated output) that give the distance
    matrices. ``parallel`` / ``serial``: :func:`pkd.cka.rbf_cka` with every
    Numba pass forced to one twin (both compute the Gram matrices on NumPy's
    OpenBLAS, one thread per call). ``numpy``: :func:`_numpy_rbf_cka`. The
    floor is timed in a block of its own: scipy's OpenBLAS threads spin after
    each call and would take a core from the pkd call after it.
    """
    out = sys.stdout if out is None else out
    import numba
    from scipy.linalg import blas

    from . import cka

    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d_s), dtype=np.float32)
    mixing = rng.standard_normal((d_s, d_t), dtype=np.float32) / np.float32(np.sqrt(d_s))
    Y = (np.tanh(X @ mixing) + rng.standard_normal((n, d_t), dtype=np.float32)).astype(np.float32)
    centred = cka._centred(X), cka._centred(Y)
    gram = np.empty((n, n), order="F")

    def gemms():
        for a in centred:
            blas.dsyrk(1.0, a.T, trans=1, c=gram, overwrite_c=1, beta=0.0)

    def ours(parallel):
        return lambda: cka._rbf_matrix([X], [Y], None, 0.5, None, 0, ("X", "Y"), parallel)

    times = _median_times([{"parallel": ours(True), "serial": ours(False)}, {"gemm": gemms},
                           {"numpy": lambda: _numpy_rbf_cka(X, Y)}], repeats)
    value, expected = float(ours(None)()[0, 0]), _numpy_rbf_cka(X, Y)
    result = {"n_rows": n, "d_s": d_s, "d_t": d_t, "numba_threads": numba.get_num_threads(),
              "parallel_s": times["parallel"], "serial_s": times["serial"],
              "numpy_s": times["numpy"], "gemm_s": times["gemm"],
              "parallel_vs_gemm": times["parallel"] / times["gemm"],
              "serial_vs_parallel": times["serial"] / times["parallel"],
              "numpy_vs_parallel": times["numpy"] / times["parallel"],
              "cka": value, "numpy_difference": abs(value - expected)}
    print(f"\nRBF CKA, N={n}, {d_s}→{d_t}, float32, {result['numba_threads']} Numba threads: "
          f"parallel twin {times['parallel']:.3f} s = {result['parallel_vs_gemm']:.2f}× its "
          f"float64 X Xᵀ GEMMs alone ({times['gemm']:.3f} s); serial twin "
          f"{result['serial_vs_parallel']:.2f}× the parallel; NumPy "
          f"{result['numpy_vs_parallel']:.1f}× the parallel (|difference| "
          f"{result['numpy_difference']:.1e})", file=out)
    return result


LAYER_ANALYSIS_CASE = (3000, 7, 13, 384, 768)  # N, n_s, n_t, d_s, d_t
LAYER_ANALYSIS_QUICK = (1000, 2, 3, 384, 768)
HELDOUT_FOLDS = 5


def bench_layer_analysis(n=3000, n_s=7, n_t=13, d_s=384, d_t=768, repeats=5,
                         out=None) -> dict:
    """The all-pairs analysis of float32 layers: statistics, ``min_mse()`` and ``cka()``.

    Against its float64 GEMM floor (a dsyrk per layer and one dgemm for every
    cross block, scipy's BLAS, as the accumulation calls them) and against
    fitting every pair with ``numpy.linalg.lstsq`` on float64 copies (timed
    once: it is slow), and the same analysis with 5-fold held-out estimates
    (``relative_min_mse(heldout=True)``), its cost reported as a fraction added.
    """
    out = sys.stdout if out is None else out
    from .alignment import AlignmentStats

    student, teacher, s64, t64, gemms = _layers_and_gemm_floor(n, n_s, n_t, d_s, d_t)

    def analysis():
        stats = AlignmentStats.from_arrays(student, teacher)
        return stats.min_mse(), stats.cka()

    def heldout():
        stats = AlignmentStats.from_arrays(student, teacher, folds=HELDOUT_FOLDS)
        return stats.min_mse(), stats.cka(), stats.relative_min_mse(heldout=True)

    # The held-out run in a block of its own: its fold statistics (1.7 GB here), freed after
    # each run, slowed the first touches of the run after it (docs/performance.md).
    times = _median_times([{"pkd": analysis, "gemm": gemms}, {"heldout": heldout}], repeats)
    start = time.perf_counter()
    for S in s64:
        for T in t64:
            np.linalg.lstsq(S, T, rcond=None)
    lstsq_s = time.perf_counter() - start
    result = {"n_rows": n, "n_student": n_s, "n_teacher": n_t, "d_s": d_s, "d_t": d_t,
              "analysis_s": times["pkd"], "gemm_s": times["gemm"],
              "analysis_vs_gemm": times["pkd"] / times["gemm"], "lstsq_s": lstsq_s,
              "lstsq_vs_analysis": lstsq_s / times["pkd"],
              "heldout_s": times["heldout"],
              "heldout_added": times["heldout"] / times["pkd"] - 1,
              "heldout_floor_added": _heldout_floor(n, n_s, n_t, d_s, d_t)}
    folds = (f"; with {HELDOUT_FOLDS}-fold held-out estimates {times['heldout']:.2f} s "
             f"(+{100 * result['heldout_added']:.0f}%; the held-out query's products alone are "
             f"+{100 * result['heldout_floor_added']:.0f}% of the accumulation's at N={n})")
    print(f"\nlayer analysis, {n_s}×{n_t} layers, N={n}, {d_s}→{d_t}, float32: statistics + "
          f"min_mse + cka {times['pkd']:.2f} s = {result['analysis_vs_gemm']:.2f}× its float64 "
          f"GEMMs alone ({times['gemm']:.2f} s); {n_s * n_t} numpy.linalg.lstsq fits "
          f"{lstsq_s:.1f} s ({result['lstsq_vs_analysis']:.0f}× slower){folds}", file=out)
    return result


def _heldout_floor(n, n_s, n_t, d_s, d_t) -> float:
    """The held-out query's product flops over the accumulation's (docs/numerics.md, §3).

    Per fold and student layer, three products of a (d_s × d_s) triangular matrix
    with a (d_s × Σd_t) matrix (``d_s² Σd_t`` flops each), whatever the row count;
    the accumulation is a dsyrk per layer and the cross dgemm over the ``n`` rows.
    """
    query = HELDOUT_FOLDS * n_s * 3 * d_s * d_s * n_t * d_t
    accumulation = n * (n_s * d_s**2 + n_t * d_t**2 + 2 * n_s * d_s * n_t * d_t)
    return query / accumulation


DUMP_CASE = (2048, (1000, 20_000))  # texts timed, texts per memory run
DUMP_QUICK = (512, (200, 2000))
DUMP_BATCH = 32
_DUMP_WORDS = ("the a an cat dog bird fish sat ran flew swam on under over mat tree river big "
               "small red blue green old young quick slow and or but is was very not").split()


def save_tiny_bert(directory, *, layers: int = 4, width: int = 64, seed: int = 0) -> Path:
    """Save a randomly initialised BertModel and a WordPiece tokenizer in ``directory``.

    Built from a ``BertConfig`` (``layers`` layers of width ``width``, the
    weights drawn with torch seeded by ``seed``) and a vocabulary of
    ``_DUMP_WORDS`` written here: nothing is downloaded.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_DUMP_WORDS]
    config = BertConfig(vocab_size=len(vocab), hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * width,
                        max_position_embeddings=64)
    torch.manual_seed(seed)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its shard-writing bar would land in the bench's output
    try:
        BertModel(config).eval().save_pretrained(directory)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab_file=str(vocab_file)).save_pretrained(directory)
    return directory


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 3–29 words drawn from the tiny BERT's vocabulary, reproducibly."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, size=n)
    return [" ".join(rng.choice(_DUMP_WORDS, size=k)) for k in lengths]


# Run in a fresh process: one dump, then the process's peak resident set (ru_maxrss, KiB).
_DUMP_PEAK_SCRIPT = """import resource, sys
from pkd.bench import synthetic_texts
from pkd.hf import dump_hidden_states, load_model
model, tokenizer = load_model(sys.argv[1])
dump_hidden_states(model, tokenizer, synthetic_texts(int(sys.argv[2])), sys.argv[3],
                   batch_size=int(sys.argv[4]), pool="none", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _dump_peak_mib(model_dir: Path, n_texts: int, path: Path, batch_size: int) -> float:
    """Peak resident memory (MiB) of a fresh process that dumps ``n_texts`` token-level."""
    root = str(Path(__file__).resolve().parent.parent)  # this pkd, not another installed one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    run = subprocess.run([sys.executable, "-c", _DUMP_PEAK_SCRIPT, str(model_dir),
                          str(n_texts), str(path), str(batch_size)],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"the dump of {n_texts} texts failed:\n{run.stderr}")
    path.unlink()
    return int(run.stdout.strip().splitlines()[-1]) / 1024


def bench_dump(n_texts=2048, memory_texts=(1000, 20_000), batch_size=DUMP_BATCH, repeats=5,
               torch_threads=1, out=None) -> dict:
    """``pkd.hf.dump_hidden_states``'s own work against the model's forward; its peak memory.

    A tiny BERT (4 layers of width 64, :func:`save_tiny_bert`) on
    ``n_texts`` :func:`synthetic_texts`, token-level (``pool="none"``), in
    batches of ``batch_size``. Four contenders, timed round-robin in one
    process with ``torch_threads`` torch threads (one by default: a width-64
    model's forward is too small for torch's intra-op pool, whose waits then
    make the figure the machine's load; see docs/performance.md): ``dump``,
    the whole call writing its ``.safetensors`` (a new file each run, as a dump
    to a new path: overwriting a dump adds the file system's deletion of the
    old one, see docs/performance.md); ``forward``, the model alone under
    ``torch.inference_mode()`` with ``output_hidden_states=True`` on the
    same padded batches, prepared beforehand; ``tokenise``, what a plain
    loop pays for those batches (``tokenizer(batch, padding=True,
    return_tensors="pt")``). pkd's share is ``(dump − forward − tokenise) /
    forward``: pooling, copies, writing, and any cost of tokenising each
    text once over tokenising each batch; ``tokenise_once``, the dump's
    tokenisation alone, splits that share into its tokenisation's extra and
    the rest (pooling, copies, writing). Peak memory: ``ru_maxrss`` of a
    fresh process dumping each of ``memory_texts``, the last against the
    first. Without transformers or torch, one line says it was skipped.
    """
    out = sys.stdout if out is None else out
    try:
        torch = _torch()
        if torch is None:
            raise ImportError("No module named 'torch'")
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"\ndump: skipped, it needs transformers and torch: pip install 'pkd[hf]' "
              f"({exc})", file=out)
        return {"skipped": str(exc)}
    import tempfile

    from .hf import _padded_batch, _tokenise, dump_hidden_states, load_model

    with tempfile.TemporaryDirectory(prefix="pkd-bench-dump-") as tmp:
        tmp = Path(tmp)
        model_dir = save_tiny_bert(tmp / "bert")
        model, tokenizer = load_model(model_dir)
        texts = synthetic_texts(n_texts)
        spans = [(s, min(s + batch_size, n_texts)) for s in range(0, n_texts, batch_size)]

        def tokenise():
            return [tokenizer(texts[s:e], padding=True, return_tensors="pt") for s, e in spans]

        batches = tokenise()

        def tokenise_once():  # the dump's way: every text tokenised once, batches padded
            tokens = _tokenise(tokenizer, texts, None)
            return [_padded_batch(tokenizer, tokens, s, e)[0] for s, e in spans]

        def forward():
            with torch.inference_mode():
                for batch in batches:
                    model(**batch, output_hidden_states=True)

        runs = itertools.count()

        def dump():  # a new file each run: replacing the last would time its deletion too
            dump_hidden_states(model, tokenizer, texts, tmp / f"timed{next(runs)}.safetensors",
                               batch_size=batch_size, pool="none", progress=False)

        threads = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        try:
            times = _median_times([{"dump": dump, "forward": forward, "tokenise": tokenise,
                                    "tokenise_once": tokenise_once}], repeats)
        finally:
            torch.set_num_threads(threads)
        peaks = [_dump_peak_mib(model_dir, n, tmp / "peak.safetensors", batch_size)
                 for n in memory_texts]
    n_batches = len(spans)
    share = (times["dump"] - times["forward"] - times["tokenise"]) / times["forward"]
    result = {"n_texts": n_texts, "batch_size": batch_size, "layers": 4, "width": 64,
              "pool": "none", "torch_threads": torch_threads,
              "dump_s": times["dump"], "forward_s": times["forward"],
              "tokenise_s": times["tokenise"],
              "forward_ms_per_batch": times["forward"] / n_batches * 1e3,
              "tokenise_ms_per_batch": times["tokenise"] / n_batches * 1e3,
              "pkd_ms_per_batch": (times["dump"] - times["forward"] - times["tokenise"])
              / n_batches * 1e3,
              "pkd_share_of_forward": share,
              "tokenise_share_of_forward": times["tokenise"] / times["forward"],
              "tokenise_once_s": times["tokenise_once"],
              "tokenise_once_extra_share": (times["tokenise_once"] - times["tokenise"])
              / times["forward"],
              "writing_share": (times["dump"] - times["forward"] - times["tokenise_once"])
              / times["forward"],
              "memory_texts": list(memory_texts), "peak_rss_mib": peaks,
              "peak_ratio": peaks[-1] / peaks[0]}
    print(f"\ndump, tiny BERT (4 layers × 64), {n_texts} texts of 3–29 words, batch "
          f"{batch_size}, token-level, torch threads {torch_threads}: whole dump "
          f"{times['dump']:.2f} s, forward alone {times['forward']:.2f} s "
          f"({result['forward_ms_per_batch']:.1f} ms a batch), tokenisation "
          f"{times['tokenise']:.2f} s ({result['tokenise_ms_per_batch']:.1f} ms a batch, "
          f"{100 * result['tokenise_share_of_forward']:.0f}% of the forward); pkd's own work "
          f"{result['pkd_ms_per_batch']:.2f} ms a batch = {100 * share:.1f}% of the forward: "
          f"tokenising each text once and padding from the ids "
          f"{100 * result['tokenise_once_extra_share']:+.1f}%, pooling, copies and writing "
          f"{100 * result['writing_share']:.1f}%", file=out)
    print("dump peak memory (fresh process, ru_maxrss): "
          + ", ".join(f"{n:,} texts {p:.1f} MiB" for n, p in zip(memory_texts, peaks, strict=True))
          + f" ({100 * (result['peak_ratio'] - 1):+.1f}%)", file=out)
    return result


# The floor of any Numba library's first call: a trivial cached kernel, first called in a
# fresh process. Numba loads its typing and lowering registries (and imports
# scipy.linalg to find BLAS) on the first kernel of a process, whatever the kernel.
_FLOOR_MODULE = """import numba


@numba.njit(cache=True)
def total(x):
    acc = 0.0
    for i in range(x.shape[0]):
        acc += x[i]
    return acc
"""


def startup_times(repeats: int = 3) -> dict:
    """Start-up costs, each a fresh process (median of ``repeats``).

    ``import_s``: ``import pkd``; ``first_call_warm_s`` / ``first_call_cold_s``:
    import and the first ``loss_and_grad`` with Numba's on-disk cache warm /
    empty; ``numba_floor_s``: import numpy and numba and call a trivial cached
    kernel for the first time (warm cache), the floor under the first call.
    """
    import tempfile

    first_call = (
        "import time; t=time.perf_counter(); import numpy as np, pkd; "
        "r=np.random.default_rng(0); S=r.standard_normal((64,32),dtype=np.float32); "
        "T=r.standard_normal((64,48),dtype=np.float32); "
        "c=pkd.ProgressiveDistillation([(0,0)]).with_projection(32,48,seed=0); "
        "c.loss_and_grad([S],[T]); print(time.perf_counter()-t)"
    )
    import_only = "import time; t=time.perf_counter(); import pkd; print(time.perf_counter()-t)"

    def run(code, env=None):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    run(first_call)  # make sure the on-disk cache is warm
    result = {
        "import_s": statistics.median(run(import_only) for _ in range(repeats)),
        "first_call_warm_s": statistics.median(run(first_call) for _ in range(repeats)),
    }
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        result["first_call_cold_s"] = run(first_call, env)
        with open(os.path.join(cache, "_pkd_floor.py"), "w") as f:
            f.write(_FLOOR_MODULE)
        floor_call = (
            f"import time; t=time.perf_counter(); import sys; sys.path.insert(0, {cache!r}); "
            "import numpy as np, _pkd_floor; _pkd_floor.total(np.ones(3)); "
            "print(time.perf_counter()-t)"
        )
        run(floor_call, env)  # compile and cache it
        result["numba_floor_s"] = statistics.median(run(floor_call, env)
                                                    for _ in range(repeats))
    return result


OVERHEAD_SHAPE = (8, 8, 16)  # N, d_s, d_t: inputs so small that only the fixed cost is left
OVERHEAD_ROUNDS = 7


def call_overhead(calls: int = 2000, repeats: int = OVERHEAD_ROUNDS) -> dict:
    """The fixed cost of a call, in µs: float32 inputs of ``OVERHEAD_SHAPE``.

    The best of ``repeats`` rounds of ``calls`` calls each (a floor: machine
    noise only adds). ``one_pair_us``: :func:`pkd.projected_mse_grad`;
    ``four_pairs_us``: ``ProgressiveDistillation.loss_and_grad`` over 4 pairs
    sharing P; ``*_floor_us``: what those calls cannot avoid, the three GEMMs
    and the fused pass of each pair called directly. The difference is the
    Python around them (validation, buffers, dispatch), which is what weighs
    on the sub-millisecond cases of the grid.
    """
    import pkd
    from pkd import engine

    n, d_s, d_t = OVERHEAD_SHAPE
    student, teacher, projection, _ = _case_arrays(n, d_s, d_t, np.float32, n_layers=4)
    cfg = pkd.ProgressiveDistillation([(k, k) for k in range(4)], projection=projection,
                                      project="always")
    fused = engine.fused_pass(False, True)
    y = np.empty((n, d_t), np.float32)
    grad_projection, grad_student = np.empty_like(projection), np.empty_like(student[0])
    rows, row_loss, scale = np.arange(n), np.empty(n), np.float32(2.0 / (n * d_t))

    def floor(layers):
        def run():
            for k in range(layers):
                np.matmul(student[k], projection, out=y)
                fused(y, teacher[k], rows, scale, row_loss)
                np.matmul(student[k].T, y, out=grad_projection)
                np.matmul(y, projection.T, out=grad_student)
        return run

    contenders = {
        "one_pair_us": lambda: pkd.projected_mse_grad(student[0], teacher[0], projection),
        "one_pair_floor_us": floor(1),
        "four_pairs_us": lambda: cfg.loss_and_grad(student, teacher),
        "four_pairs_floor_us": floor(4),
    }
    best = dict.fromkeys(contenders, math.inf)
    for fn in contenders.values():
        fn()
    for _ in range(repeats):  # round-robin, so that a slow stretch hits every contender
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return best


def bench_cases(*, quick: bool, dtypes=None, variants) -> list[tuple]:
    """``(variant, N, d_s, d_t, dtype)`` of every case to run, in order.

    The full grid is every N × (d_s, d_t) of ``GRID_N`` × ``GRID_SHAPES``;
    ``quick`` keeps ``QUICK_CASES``. ``dtypes`` defaults to float32 and float64,
    or float32 only with ``quick``; given dtypes are honoured either way.
    """
    sizes = QUICK_CASES if quick else [(n, d_s, d_t) for d_s, d_t in GRID_SHAPES for n in GRID_N]
    if dtypes is None:
        dtypes = ("float32",) if quick else ("float32", "float64")
    return [(v, n, d_s, d_t, dtype) for dtype in dtypes for v in variants
            for n, d_s, d_t in sizes if v in GRID_VARIANTS]


def check_variants(variants) -> tuple[str, ...]:
    """Variants asked for by name, as a tuple: each must exist and be runnable here.

    (:func:`run_bench` itself leaves the torch variants out when torch is not
    installed, so that running every variant runs what it can.)

    Raises
    ------
    ValueError
        An unknown variant, or a torch variant without torch installed.
    """
    variants = tuple(dict.fromkeys(variants))  # a variant named twice runs once
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
    needs_torch = [v for v in variants if v in TORCH_VARIANTS]
    if needs_torch and _torch() is None:
        raise ValueError(f"variant(s) {', '.join(map(repr, needs_torch))} need torch, which "
                         "is not installed: pip install 'pkd[torch]'")
    return variants


def run_bench(*, quick: bool = False, dtypes=None, variants=VARIANTS,
              repeats: int = 5, progress: bool = True, out=None) -> dict:
    """Run the benchmark grid; print a table as it goes; return everything as a dict.

    ``dtypes`` defaults as in :func:`bench_cases`. Without torch the torch
    variants are left out. ``progress`` shows a bar on stderr when stderr is a
    terminal; the table's rows are written through it, so they never land on
    the bar's line.
    """
    out = sys.stdout if out is None else out  # at call time: redirects made after import count
    from tqdm.auto import tqdm

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 5:
        raise ValueError(f"repeats must be an int >= 5 (the figures are medians), got "
                         f"{repeats!r}")

    header = machine_header()
    print(_format_header(header), file=out)
    if _torch() is None:
        variants = tuple(v for v in variants if v not in TORCH_VARIANTS)
    cases = bench_cases(quick=quick, dtypes=dtypes, variants=variants)
    rows = []
    print(_format_row(None), file=out)
    # disable=None: no bar where stderr is not a terminal (a log, a pipe), as in `pkd analyze`.
    with tqdm(cases, desc="bench", disable=None if progress else True, leave=False) as bar:
        for case in bar:
            row = bench_case(*case, repeats=repeats)
            rows.append(row)
            # Through the bar: on a terminal that shows both, a plain print would land
            # on the bar's line; write() clears the bar first and redraws it below.
            bar.write(_format_row(row), file=out)
            out.flush()
    extra = {}
    if not quick and "alignment" in variants:
        extra["alignment_6x12"] = bench_alignment_matrix(out=out)
    if "rbf cka" in variants:
        n, d_s, d_t = RBF_CKA_QUICK if quick else RBF_CKA_CASE
        extra["rbf_cka"] = bench_rbf_cka(n, d_s, d_t, repeats=repeats, out=out)
    if "layer analysis" in variants:
        n, n_s, n_t, d_s, d_t = LAYER_ANALYSIS_QUICK if quick else LAYER_ANALYSIS_CASE
        extra["layer_analysis"] = bench_layer_analysis(n, n_s, n_t, d_s, d_t,
                                                       repeats=repeats, out=out)
    if "dump" in variants:
        n_texts, memory_texts = DUMP_QUICK if quick else DUMP_CASE
        extra["dump"] = bench_dump(n_texts, memory_texts, repeats=repeats, out=out)
    overhead = call_overhead(calls=500 if quick else 2000)
    print(f"\n{describe_call_overhead(overhead)}", file=out)
    startup = startup_times(repeats=1 if quick else 3)
    print(f"import pkd: {startup['import_s']:.2f} s; first loss_and_grad in a fresh process: "
          f"{startup['first_call_warm_s']:.2f} s (warm cache), "
          f"{startup['first_call_cold_s']:.2f} s (cold: compiling); the floor, a trivial "
          f"cached Numba kernel's first call: {startup['numba_floor_s']:.2f} s", file=out)
    return {"header": header, "rows": [asdict(r) | {"vs_gemm": r.vs_gemm} for r in rows],
            "call_overhead": overhead, "startup": startup, "repeats": repeats,
            "rounds": ROUNDS, "min_round_s": _MIN_ROUND_S, "quick": quick} | extra


def describe_call_overhead(overhead: dict) -> str:
    """:func:`call_overhead`'s result as a sentence."""
    n, d_s, d_t = OVERHEAD_SHAPE
    return (f"Fixed cost of a call (N = {n}, {d_s}×{d_t} float32, best of "
            f"{OVERHEAD_ROUNDS} rounds): projected_mse_grad {overhead['one_pair_us']:.1f} µs, "
            f"of which the GEMMs and the fused pass {overhead['one_pair_floor_us']:.1f} µs; "
            f"4 pairs sharing P "
            f"{overhead['four_pairs_us']:.1f} µs ({overhead['four_pairs_floor_us']:.1f} µs).")


def describe_cpu(header: dict) -> str:
    """The header's CPU, with its family, model and cache sizes when known."""
    details = [header.get("cpu_model")] + [f"{name} {size}" for name, size
                                           in (header.get("caches") or {}).items()]
    details = "; ".join(d for d in details if d)
    return f"{header.get('cpu')} ({details})" if details else str(header.get("cpu"))


def _format_header(header: dict) -> str:
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']}, "
                     f"{b['num_threads']} threads)" for b in header["blas"])
    torch = (f"torch {header['torch']} ({header['torch_threads']} threads)"
             if header["torch"] else "torch not installed")
    return (f"machine: {describe_cpu(header)}, {header['cores']} cores\n"
            f"numpy {header['numpy']}, numba {header['numba']} "
            f"({header['numba_threads']} threads), BLAS: {blas}; {torch}\n"
            "ratios: pkd time / GEMMs-alone time (lower is better, 1.00 = the physical limit);"
            " numpy/pkd and torch/pkd speed-ups (higher is better); torch BLAS = the same GEMMs"
            " in torch / in numpy; medians")


def _format_row(row: Row | None) -> str:
    if row is None:
        return (f"{'variant':<18}{'dtype':<8}{'N':>6} {'d_s×d_t':>9} {'pkd ms':>9} "
                f"{'×gemm':>6} {'numpy/pkd':>9} {'torch/pkd':>9} {'torch BLAS':>10} "
                f"{'peak MB':>8} {'budget':>7}")

    def fmt(x, width, digits):  # a missing figure keeps its column: "-", right-aligned
        return f"{'-' if x is None else format(x, f'.{digits}f'):>{width}}"

    return (f"{row.variant:<18}{row.dtype:<8}{row.n_rows:>6} {row.d_s:>4}×{row.d_t:<4} "
            f"{row.pkd_ms:>9.3f} {row.vs_gemm:>6.2f} {fmt(row.speedup(row.numpy_ms), 9, 2)} "
            f"{fmt(row.speedup(row.torch_ms), 9, 2)} {fmt(row.torch_blas, 10, 2)} "
            f"{fmt(row.peak_mb, 8, 1)} {fmt(row.budget_mb, 7, 1)}")


def write_json(result: dict, path) -> None:
    """Write the benchmark result atomically."""
    from ._atomic import atomic_open

    with atomic_open(path, "w") as f:
        json.dump(result, f, indent=2)
