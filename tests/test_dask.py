"""Distributed alignment statistics: AlignmentStats.from_dask / from_dumps_dask (pkd._dask).

Witnesses: AlignmentStats.from_arrays on the same in-memory rows (itself
checked against tests/reference.py in test_alignment.py) to 1e-12 relative,
and tests/reference.py directly for the statistics of docs/numerics.md. One module
fixture starts a loopback-only dask.distributed LocalCluster (2 worker
processes) for the tests that need real workers, and always shuts it down.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from pkd import _dask, cli  # noqa: E402
from pkd.alignment import AlignmentStats  # noqa: E402
from pkd.io import load_dump, save_dump  # noqa: E402

RTOL = 1e-12


def make_layers(rng, lead, student_widths, teacher_widths, *, dtypes=(np.float64,)):
    """Layers sharing a low-rank signal (non-trivial fits), dtypes cycled over layers."""
    latent = rng.standard_normal((*lead, 3))
    widths = list(student_widths) + list(teacher_widths)
    layers = [
        (latent @ rng.standard_normal((3, d)) + 0.5 * rng.standard_normal((*lead, d)) + 2.0)
        .astype(dtypes[k % len(dtypes)])
        for k, d in enumerate(widths)
    ]
    return layers[:len(student_widths)], layers[len(student_widths):]


def close(a, b, rtol=RTOL):
    """Max-norm relative agreement (entries near 0 are judged against the largest)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    a, b = a[~np.isnan(b)], b[~np.isnan(b)]
    if b.size == 0:  # e.g. the CKA of a single row
        return
    scale = max(np.max(np.abs(b)), 1e-300)
    err = np.max(np.abs(a - b)) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def assert_same_stats(got: AlignmentStats, want: AlignmentStats, *, closed_form=True):
    assert got.n_rows == want.n_rows
    assert got.student_widths == want.student_widths
    assert got.teacher_widths == want.teacher_widths
    for s in range(want.n_student):
        close(got.student_sum(s), want.student_sum(s))
        for centered in (False, True):
            close(got.student_gram(s, centered=centered), want.student_gram(s, centered=centered))
            for t in range(want.n_teacher):
                close(got.cross_gram(s, t, centered=centered),
                      want.cross_gram(s, t, centered=centered))
    for t in range(want.n_teacher):
        close(got.teacher_sum(t), want.teacher_sum(t))
        close(got.teacher_sq_norm(t), want.teacher_sq_norm(t))
        for centered in (False, True):
            close(got.teacher_gram(t, centered=centered), want.teacher_gram(t, centered=centered))
    close(got.teacher_variance(), want.teacher_variance())
    close(got.cka(), want.cka())
    if closed_form:
        close(got.min_mse(), want.min_mse())
        close(got.relative_min_mse(), want.relative_min_mse())
        close(got.min_mse(ridge=0.5), want.min_mse(ridge=0.5))
        close(got.projection(0, want.n_teacher - 1), want.projection(0, want.n_teacher - 1))


def to_dask(layers, rows_per_chunk):
    """dask arrays chunked along the first axis (whole sequences for 3-D layers)."""
    return [da.from_array(x, chunks=(rows_per_chunk,) + x.shape[1:]) for x in layers]


# ------------------------------------------------------------------ import hygiene


def test_importing_pkd_never_imports_dask():
    code = ("import sys, pkd, pkd.alignment, pkd._dask, pkd.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_classmethod_defaults_match_the_module():
    for method in (AlignmentStats.from_dask, AlignmentStats.from_dumps_dask):
        default = inspect.signature(method).parameters["split_every"].default
        assert default == _dask.DEFAULT_SPLIT_EVERY


# ------------------------------------------------------------------ from_dask, local schedulers


@pytest.mark.parametrize("lead, rows_per_chunk", [((203,), 37), ((9, 13), 2)])
@pytest.mark.parametrize("mask_kind", [None, "numpy", "dask"])
def test_from_dask_equals_from_arrays(lead, rows_per_chunk, mask_kind):
    rng = np.random.default_rng(len(lead) * 10 + (mask_kind is None))
    students, teachers = make_layers(rng, lead, (5, 3), (4, 6, 4),
                                     dtypes=(np.float32, np.float64))
    mask = None
    if mask_kind is not None:
        mask = rng.random(lead) < 0.6
        flat = mask.reshape(-1)
        n_first = rows_per_chunk * (int(np.prod(lead[1:])) if len(lead) == 2 else 1)
        flat[n_first:2 * n_first] = False  # the second block selects no row
        flat[-3:] = True
    want = AlignmentStats.from_arrays(students, teachers, mask)
    n_blocks = -(-lead[0] // rows_per_chunk)
    assert n_blocks >= 4 and lead[0] % rows_per_chunk  # several blocks, an uneven last one
    given_mask = mask
    if mask_kind == "dask":
        given_mask = da.from_array(mask, chunks=(3,) + mask.shape[1:])  # chunked differently
    got = AlignmentStats.from_dask(to_dask(students, rows_per_chunk),
                                   to_dask(teachers, rows_per_chunk), given_mask,
                                   chunk_rows=16, scheduler="threads")
    assert isinstance(got, AlignmentStats) and got.chunk_rows == 16
    assert_same_stats(got, want)


def test_from_dask_matches_the_reference_formulas():
    rng = np.random.default_rng(3)
    students, teachers = make_layers(rng, (150,), (4, 5), (6,))
    mask = rng.random(150) < 0.7
    got = AlignmentStats.from_dask(to_dask(students, 40), to_dask(teachers, 40), mask,
                                   scheduler="synchronous")
    ref = reference.reference_gram_stats([x[mask] for x in students], [x[mask] for x in teachers])
    assert got.n_rows == ref["n_w"]
    for s in range(2):
        close(got.student_gram(s), ref["G"][s], 1e-10)
        close(got.cross_gram(s, 0), ref["C"][s][0], 1e-10)
        close(got.student_sum(s), ref["a"][s], 1e-10)
        close(got.cka()[s, 0], reference.reference_cka(students[s][mask], teachers[0][mask]),
              1e-10)
        close(got.min_mse()[s, 0],
              reference.reference_min_mse(students[s][mask], teachers[0][mask])[0], 1e-10)
    close(got.teacher_gram(0), ref["H"][0], 1e-10)
    close(got.teacher_sq_norm(0), ref["q"][0], 1e-10)


def test_mismatched_chunkings_are_rechunked():
    rng = np.random.default_rng(4)
    students, teachers = make_layers(rng, (7, 11), (6, 6), (5, 8))
    mask = rng.random((7, 11)) < 0.8
    want = AlignmentStats.from_arrays(students, teachers, mask)
    dask_students = [da.from_array(students[0], chunks=(2, 4, 3)),  # T and width chunked
                     da.from_array(students[1], chunks=(3, 11, 6))]
    dask_teachers = [da.from_array(teachers[0], chunks=(1, 11, 2)),
                     da.from_array(teachers[1], chunks=(5, 5, 8))]
    got = AlignmentStats.from_dask(dask_students, dask_teachers, da.from_array(mask, chunks=4),
                                   scheduler="sync")
    assert_same_stats(got, want)


def test_stacked_dask_array_and_two_dimensional_rows():
    rng = np.random.default_rng(5)
    stacked_s = rng.standard_normal((3, 120, 4))
    stacked_t = rng.standard_normal((2, 120, 6))
    want = AlignmentStats.from_arrays(stacked_s, stacked_t)
    got = AlignmentStats.from_dask(da.from_array(stacked_s, chunks=(1, 25, 4)),
                                   da.from_array(stacked_t, chunks=(2, 50, 6)), scheduler="sync")
    assert_same_stats(got, want)


def test_large_mean_small_spread_keeps_centred_statistics_exact():
    # Blocks get different shifts; merging must not cancel (Chan's update). The closed
    # form is itself ill-conditioned here (alignment.py: precision limit), so only the
    # statistics and CKA are compared.
    rng = np.random.default_rng(6)
    students, teachers = make_layers(rng, (1200,), (5, 7), (6, 6), dtypes=(np.float32,))
    students = [(100 + 1e-3 * x).astype(np.float32) for x in students]
    teachers = [(-50 + 1e-3 * x).astype(np.float32) for x in teachers]
    want = AlignmentStats.from_arrays(students, teachers)
    got = AlignmentStats.from_dask(to_dask(students, 130), to_dask(teachers, 130),
                                   chunk_rows=50, scheduler="sync")
    assert_same_stats(got, want, closed_form=False)
    close(got.cka()[0, 1], reference.reference_cka(students[0], teachers[1]), 1e-9)


def test_result_does_not_depend_on_the_scheduler():
    rng = np.random.default_rng(7)
    students, teachers = make_layers(rng, (300,), (4,), (5, 3))
    args = (to_dask(students, 29), to_dask(teachers, 29), rng.random(300) < 0.5)
    for split_every in (2, 3):
        sync = AlignmentStats.from_dask(*args, split_every=split_every, scheduler="sync")
        threads = AlignmentStats.from_dask(*args, split_every=split_every, scheduler="threads")
        for key, value in sync.to_dict().items():
            np.testing.assert_array_equal(threads.to_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("lead", [(12,), (12, 3)])
@pytest.mark.parametrize("mask_kind", [None, "numpy", "dask"])
def test_zero_length_row_chunks_are_skipped(lead, mask_kind):
    # Boolean filtering then compute_chunk_sizes() (what the unknown-chunks error advises)
    # leaves a zero-length block where a whole chunk was filtered out.
    rng = np.random.default_rng(9)
    students, teachers = make_layers(rng, lead, (3,), (4,))
    keep = np.r_[np.ones(4), np.zeros(4), np.ones(4)].astype(bool)
    keep_dask = da.from_array(keep, chunks=4)

    def filtered(layers):
        out = []
        for x in layers:
            x = da.from_array(x, chunks=(4,) + x.shape[1:])[keep_dask]
            x.compute_chunk_sizes()
            out.append(x)
        return out

    dask_students, dask_teachers = filtered(students), filtered(teachers)
    assert dask_students[0].chunks[0] == (4, 0, 4)
    kept_lead = (8,) + lead[1:]
    mask = None if mask_kind is None else rng.random(kept_lead) < 0.7
    if mask is not None:
        mask.reshape(-1)[0] = True
    given_mask = mask
    if mask_kind == "dask":
        given_mask = da.from_array(mask, chunks=(3,) + mask.shape[1:])
    want = AlignmentStats.from_arrays([x[keep] for x in students], [x[keep] for x in teachers],
                                      mask)
    got = AlignmentStats.from_dask(dask_students, dask_teachers, given_mask, chunk_rows=4,
                                   scheduler="sync")
    assert_same_stats(got, want)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_any_chunking_and_mask(data):
    three_d = data.draw(st.booleans(), label="3-D")
    lead = (data.draw(st.integers(1, 12)), data.draw(st.integers(1, 5))) if three_d else \
        (data.draw(st.integers(2, 60)),)
    chunks, left = [], lead[0]
    while left:
        chunks.append(data.draw(st.integers(1, left)))
        left -= chunks[-1]
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    students, teachers = make_layers(rng, lead, (3,), (2, 4), dtypes=(np.float32, np.float64))
    mask = rng.random(lead) < data.draw(st.sampled_from([0.3, 0.9, 1.0]))
    mask.reshape(-1)[rng.integers(mask.size)] = True
    split_every = data.draw(st.integers(2, 5))

    def as_dask(layers):
        return [da.from_array(x, chunks=(tuple(chunks),) + x.shape[1:]) for x in layers]

    want = AlignmentStats.from_arrays(students, teachers, mask)
    got = AlignmentStats.from_dask(as_dask(students), as_dask(teachers), mask,
                                   chunk_rows=data.draw(st.integers(1, 40)),
                                   split_every=split_every, scheduler="sync")
    # Tiny, nearly singular fits make min-MSE ill-conditioned: compare the statistics.
    assert_same_stats(got, want, closed_form=False)


# ------------------------------------------------------------------ from_dask: bad input


@pytest.fixture
def small():
    rng = np.random.default_rng(8)
    students, teachers = make_layers(rng, (40,), (3,), (4,))
    return to_dask(students, 10), to_dask(teachers, 10), students, teachers


def test_refuses_numpy_layers(small):
    _, dask_teachers, students, _ = small
    with pytest.raises(TypeError, match=r"student_layers\[0\] must be a dask array.*from_array"):
        AlignmentStats.from_dask(students, dask_teachers)
    with pytest.raises(TypeError, match="from_arrays"):
        AlignmentStats.from_dask(np.stack(students), dask_teachers)


def test_refuses_empty_layer_list(small):
    dask_students, _, _, _ = small
    with pytest.raises(ValueError, match="teacher_layers is an empty sequence"):
        AlignmentStats.from_dask(dask_students, [])


def test_refuses_integer_dtype(small):
    dask_students, _, _, _ = small
    with pytest.raises(TypeError, match=r"teacher_layers\[0\] must be float32 or float64"):
        AlignmentStats.from_dask(dask_students, [da.zeros((40, 4), dtype=np.int64, chunks=10)])


def test_refuses_wrong_ndim(small):
    dask_students, _, _, _ = small
    with pytest.raises(ValueError, match=r"teacher_layers\[0\] must be 2-D .* shape \(40,\)"):
        AlignmentStats.from_dask(dask_students, [da.zeros(40, chunks=10)])


def test_refuses_rows_that_disagree(small):
    dask_students, dask_teachers, _, _ = small
    with pytest.raises(ValueError, match=r"student_layers\[0\] and teacher_layers\[0\] disagree"):
        AlignmentStats.from_dask(dask_students, [dask_teachers[0][:30]])


def test_refuses_unknown_chunk_sizes(small):
    dask_students, dask_teachers, _, _ = small
    filtered = dask_teachers[0][dask_teachers[0][:, 0] > 0]
    with pytest.raises(ValueError, match="unknown chunk sizes.*compute_chunk_sizes"):
        AlignmentStats.from_dask(dask_students, [filtered])


def test_refuses_bad_numpy_mask_before_any_work(small):
    dask_students, dask_teachers, _, _ = small
    with pytest.raises(ValueError, match=r"mask has shape \(39,\)"):
        AlignmentStats.from_dask(dask_students, dask_teachers, np.ones(39, bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        AlignmentStats.from_dask(dask_students, dask_teachers, np.full(40, 2))
    with pytest.raises(ValueError, match="selects no row"):
        AlignmentStats.from_dask(dask_students, dask_teachers, np.zeros(40, bool))


def test_refuses_bad_dask_mask(small):
    dask_students, dask_teachers, _, _ = small
    with pytest.raises(ValueError, match=r"mask has shape \(40, 1\)"):
        AlignmentStats.from_dask(dask_students, dask_teachers, da.ones((40, 1), chunks=10))
    with pytest.raises(TypeError, match="0/1 integers or bools"):
        AlignmentStats.from_dask(dask_students, dask_teachers,
                                 da.from_array(np.array(["1"] * 40), chunks=10))
    values = np.ones(40)
    values[25] = 3.0
    with pytest.raises(ValueError, match=r"rows \[20, 30\).*only 0 and 1, found \[3.0\]"):
        AlignmentStats.from_dask(dask_students, dask_teachers, da.from_array(values, chunks=7),
                                 scheduler="sync")
    with pytest.raises(ValueError, match="selects no row"):
        AlignmentStats.from_dask(dask_students, dask_teachers, da.zeros(40, chunks=7),
                                 scheduler="sync")


def test_non_finite_values_raise_from_the_task_naming_the_block(small):
    _, dask_teachers, students, _ = small
    bad = students[0].copy()
    bad[23, 1] = np.nan
    with pytest.raises(ValueError, match=r"rows \[20, 30\).*student_layers\[0\] contains "
                                         r"NaN/Inf.*row 3, column 1"):
        AlignmentStats.from_dask([da.from_array(bad, chunks=(10, 3))], dask_teachers,
                                 scheduler="threads")
    mask = np.ones(40, bool)
    mask[23] = False  # a masked-out row may hold anything
    got = AlignmentStats.from_dask([da.from_array(bad, chunks=(10, 3))], dask_teachers, mask,
                                   scheduler="sync")
    assert got.n_rows == 39


@pytest.mark.parametrize("kwargs, error, message", [
    ({"split_every": 1}, ValueError, "split_every must be >= 2"),
    ({"split_every": 2.0}, TypeError, r"split_every must be an int > 0, got 2.0 \(float\)"),
    ({"chunk_rows": 0}, ValueError, "chunk_rows must be > 0"),
    ({"scheduler": "bogus"}, ValueError, "scheduler='bogus' is neither"),
    ({"scheduler": 3}, ValueError, "Unexpected scheduler"),
])
def test_refuses_bad_options(small, kwargs, error, message):
    dask_students, dask_teachers, _, _ = small
    with pytest.raises(error, match=message):
        AlignmentStats.from_dask(dask_students, dask_teachers, **kwargs)


def test_unreachable_scheduler_address_is_a_clear_error(small):
    dask_students, dask_teachers, _, _ = small
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ValueError, match="cannot connect to a dask.distributed scheduler"):
            AlignmentStats.from_dask(dask_students, dask_teachers,
                                     scheduler="tcp://127.0.0.1:9")


# ------------------------------------------------------------------ from_dumps_dask, local


@pytest.fixture
def dump_files(tmp_path):
    rng = np.random.default_rng(9)
    lead = (40, 16)
    students, teachers = make_layers(rng, lead, (4, 4), (6, 6, 6), dtypes=(np.float32,))
    mask = rng.random(lead) < 0.75
    mask[10:20] = False  # whole tasks of padding
    s_path, t_path = tmp_path / "student.safetensors", tmp_path / "teacher.safetensors"
    save_dump(s_path, students, attention_mask=mask)
    save_dump(t_path, teachers, attention_mask=mask.astype(np.uint8))
    return s_path, t_path, students, teachers, mask


def test_from_dumps_dask_equals_from_arrays_locally(dump_files):
    s_path, t_path, students, teachers, mask = dump_files
    want = AlignmentStats.from_arrays(students, teachers, mask)
    with load_dump(s_path) as student, load_dump(t_path) as teacher:
        got = AlignmentStats.from_dumps_dask(student, teacher, chunk_rows=24, task_rows=100,
                                             scheduler="threads", mask=mask)
        assert_same_stats(got, want)
        everything = AlignmentStats.from_dumps_dask(student, teacher, chunk_rows=24,
                                                    scheduler="sync", mask=None)
        # By default the dumps' own attention mask applies, as in from_dumps.
        own = AlignmentStats.from_dumps_dask(student, teacher, chunk_rows=24,
                                             scheduler="sync")
        local = AlignmentStats.from_dumps(student, teacher, chunk_rows=24)
    assert_same_stats(everything, AlignmentStats.from_arrays(students, teachers))
    assert own.n_rows == int(mask.sum()) < everything.n_rows
    assert_same_stats(own, want)
    assert_same_stats(local, want)


def test_default_task_rows_reads_eight_times_what_it_emits():
    rows = _dask.default_task_rows([768] * 7, [768] * 13, 4096)
    assert rows % 4096 == 0
    emitted = 7 * 768 * 13 * 768 + 20 * 768**2
    assert rows * 20 * 768 >= 8 * emitted > (rows - 4096) * 20 * 768
    assert _dask.default_task_rows([2], [3], 64) == 64


def test_from_dumps_dask_bad_input(dump_files, tmp_path):
    s_path, t_path, students, teachers, mask = dump_files
    npz = tmp_path / "teacher.npz"
    save_dump(npz, teachers)
    short = tmp_path / "short.safetensors"
    save_dump(short, [x[:30] for x in teachers])
    with load_dump(s_path) as student, load_dump(t_path) as teacher:
        with pytest.raises(TypeError, match="teacher must be a pkd.io.Dump"):
            AlignmentStats.from_dumps_dask(student, str(t_path))
        with load_dump(npz) as other, pytest.raises(ValueError, match="Convert it once"):
            AlignmentStats.from_dumps_dask(student, other)
        with load_dump(short) as other, pytest.raises(ValueError, match="disagree on rows"):
            AlignmentStats.from_dumps_dask(student, other)
        with pytest.raises(ValueError, match=r"mask has shape \(640,\)"):
            AlignmentStats.from_dumps_dask(student, teacher, mask=mask.reshape(-1))
        with pytest.raises(ValueError, match="selects no row"):
            AlignmentStats.from_dumps_dask(student, teacher, mask=np.zeros((40, 16)))
        with pytest.raises(TypeError, match="task_rows must be a positive int or None"):
            AlignmentStats.from_dumps_dask(student, teacher, task_rows=10.0)
        with pytest.raises(ValueError, match="task_rows must be > 0"):
            AlignmentStats.from_dumps_dask(student, teacher, task_rows=0)


def test_from_dumps_dask_non_finite_rows_are_named(tmp_path):
    rng = np.random.default_rng(10)
    students, teachers = make_layers(rng, (50,), (3,), (4,))
    teachers[0][37, 2] = np.inf
    save_dump(tmp_path / "s.safetensors", students)
    save_dump(tmp_path / "t.safetensors", teachers)
    with load_dump(tmp_path / "s.safetensors") as s, load_dump(tmp_path / "t.safetensors") as t:
        with pytest.raises(ValueError, match=r"rows \[30, 40\) of .*t\.safetensors.*"
                                             r"teacher_layers\[0\] contains NaN/Inf.*row 7"):
            AlignmentStats.from_dumps_dask(s, t, chunk_rows=10, task_rows=20, scheduler="sync")


def test_worker_that_cannot_see_the_file_says_so(dump_files, tmp_path):
    s_path, t_path, students, teachers, _ = dump_files
    with load_dump(s_path) as student, load_dump(t_path) as teacher:
        moved = tmp_path / "elsewhere.safetensors"
        t_path.rename(moved)  # the client's open file stays readable; the path is gone
        with pytest.raises(FileNotFoundError, match="shares, under the same path"):
            AlignmentStats.from_dumps_dask(student, teacher, scheduler="sync")
        save_dump(t_path, [x[:, :, :5] for x in teachers])  # a different file at the path
        with pytest.raises(ValueError, match="differs from the file the client opened"):
            AlignmentStats.from_dumps_dask(student, teacher, scheduler="sync")


# ------------------------------------------------------------------ a real cluster


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes on the loopback interface, shut down whatever happens."""
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  host="127.0.0.1", dashboard_address=None) as local:
        yield local


def test_local_cluster_from_dask_and_from_dumps(cluster, dump_files):
    s_path, t_path, students, teachers, mask = dump_files
    want = AlignmentStats.from_arrays(students, teachers, mask)
    with distributed.Client(cluster, set_as_default=False) as client:
        got = AlignmentStats.from_dask(to_dask(students, 7), to_dask(teachers, 7), mask,
                                       chunk_rows=32, split_every=2, scheduler=client)
        assert_same_stats(got, want)
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")  # loopback only
        assert all(address.startswith("tcp://127.0.0.1:") for address in workers)
    with load_dump(s_path) as student, load_dump(t_path) as teacher:
        got = AlignmentStats.from_dumps_dask(student, teacher, chunk_rows=32, task_rows=96,
                                             scheduler=cluster.scheduler_address, mask=mask)
    assert_same_stats(got, want)


def test_cli_analyze_with_scheduler_matches_local(cluster, dump_files, tmp_path):
    s_path, t_path, *_ = dump_files
    outputs = {}
    for name, extra in (("local", []), ("cluster", ["--scheduler", cluster.scheduler_address])):
        out = tmp_path / name
        assert cli.main(["analyze", str(s_path), str(t_path), "--out", str(out),
                         "--chunk-rows", "24", *extra]) == 0
        outputs[name] = json.loads((out / "summary.json").read_text())
    local, remote = outputs["local"], outputs["cluster"]
    assert remote["rows"] == local["rows"]
    assert remote["optimal_mapping"] == local["optimal_mapping"]
    for key in ("min_mse", "relative_min_mse", "cka"):
        close(remote[key], local[key])
