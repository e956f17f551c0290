"""Results do not depend on the thread count, nor on which twin (serial/parallel) runs."""

import os
import re
import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, sys
import numpy as np
import pkd
import pkd._estimates
import pkd.objective

if sys.argv[1] == "parallel":  # force the parallel twin of the logit pass
    pkd.objective.PARALLEL_MIN_ELEMENTS = 0
    pkd._estimates.PARALLEL_MIN_ENTRIES = 0  # and of the CKA query's centring pass
rng = np.random.default_rng(0)
student = [rng.standard_normal((6, 50, 24), dtype=np.float32) for _ in range(3)]
student.append(rng.standard_normal((6, 50, 40), dtype=np.float32))  # no projection: direct
teacher = [rng.standard_normal((6, 50, 40), dtype=np.float32) for _ in range(6)]
mask = rng.random((6, 50)) < 0.8
digest = hashlib.sha256()
for normalize in (False, True):
    cfg = pkd.ProgressiveDistillation([(0, 1), (1, 3), (2, 5), (0, 4), (3, 2)],
                                      normalize=normalize)
    cfg = cfg.with_projection(24, 40, seed=1)
    result = cfg.loss_and_grad(student, teacher, attention_mask=mask)
    digest.update(np.float64(result.loss).tobytes())
    digest.update(result.grad_projection.tobytes())
    for grad in result.grad_student:
        digest.update(grad.tobytes())
objective = pkd.PKDObjective(hidden=cfg)
logits = rng.standard_normal((6, 10), dtype=np.float32)
out = objective.loss_and_grad(logits, logits[::-1].copy(), np.arange(6) % 10,
                              student, teacher, attention_mask=mask)
digest.update(np.float64(out.loss).tobytes())
digest.update(out.grad_logits.tobytes())
stats = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask, chunk_rows=64)
digest.update(stats.min_mse().tobytes())
digest.update(stats.cka().tobytes())
folds = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask, chunk_rows=64, folds=3)
held_out = folds.relative_min_mse(heldout=True)  # tasks on pkd's threads, one per BLAS thread
digest.update(held_out.mean.tobytes())
digest.update(held_out.std.tobytes())
import pkd._moments
pkd._moments.TASK_MIN_WORK = 0  # every chunk as tasks on pkd's threads, one per BLAS thread
tasks = pkd.AlignmentStats.from_arrays(student, teacher, mask=mask, chunk_rows=64, folds=3)
for value in tasks.to_dict().values():
    digest.update(value.tobytes())
print(digest.hexdigest())
"""


def _run(threads: int, twin: str) -> str:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", SCRIPT, twin], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run 2 threads")
def test_bit_identical_with_one_and_two_threads_and_both_twins():
    results = {(threads, twin): _run(threads, twin)
               for threads in (1, 2) for twin in ("serial", "parallel")}
    assert re.fullmatch(r"[0-9a-f]{64}", results[(1, "serial")]), results
    assert len(set(results.values())) == 1, results
