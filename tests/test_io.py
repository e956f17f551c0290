"""Tests for pkd.io (hidden-state dumps) and pkd._atomic (atomic writes)."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import tempfile
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as st_save_file

from pkd import _atomic, _dump_sources, io
from pkd._atomic import atomic_open, atomic_path, atomic_write, write_together
from pkd.io import DumpError, LazyLayer, load_dump, save_dump

FORMATS = ["npz", "safetensors"]


def _layers(rng, lead, widths=(5, 5, 5), dtype=np.float32):
    return [rng.standard_normal((*lead, d)).astype(dtype) for d in widths]


def _mask(rng, lead):
    m = (rng.random(lead) < 0.6).astype(np.int64)
    m.reshape(-1)[0] = 1
    return m


def _write_raw(path: Path, arrays: dict, metadata=None):
    """Write a file without pkd's validation, to build malformed dumps."""
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        st_save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
                     metadata=metadata)


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("lead", [(11,), (3, 4)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_round_trip(tmp_path, fmt, stacked, lead, with_mask):
    rng = np.random.default_rng(0)
    layers = _layers(rng, lead)
    mask = _mask(rng, lead) if with_mask else None
    given = np.stack(layers) if stacked else layers
    path = save_dump(tmp_path / f"d.{fmt}", given, mask)
    assert path == tmp_path / f"d.{fmt}"
    with load_dump(path) as dump:
        assert dump.format == fmt and dump.stacked is stacked
        assert dump.n_layers == 3 and dump.lead_shape == lead
        assert dump.n_rows == int(np.prod(lead))
        assert [dump.width(i) for i in range(3)] == [5, 5, 5]
        assert dump.extra_keys == () and dump.metadata == {}
        for i, layer in enumerate(dump.layers):
            assert isinstance(layer, LazyLayer)
            assert layer.shape == (*lead, 5) and layer.dtype == np.float32
            got = np.asarray(layer)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, layers[i])
        if with_mask:
            assert dump.attention_mask.dtype == bool
            np.testing.assert_array_equal(dump.attention_mask, mask.astype(bool))
        else:
            assert dump.attention_mask is None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved(tmp_path, fmt, dtype):
    rng = np.random.default_rng(1)
    layers = _layers(rng, (6,), dtype=dtype)
    with load_dump(save_dump(tmp_path / f"d.{fmt}", layers)) as dump:
        assert all(layer.dtype == dtype for layer in dump.layers)
        assert dump.layers[0].rows(1, 4).dtype == dtype
        assert all(a.dtype == dtype for _, _, arrs in dump.iter_chunks(4) for a in arrs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_stored_as_is_and_upcast_to_float32(tmp_path, fmt):
    rng = np.random.default_rng(2)
    layers = _layers(rng, (2, 3), dtype=np.float16)
    with load_dump(save_dump(tmp_path / f"d.{fmt}", layers)) as dump:
        layer = dump.layers[1]
        assert layer.stored_dtype == np.float16 and layer.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(layer), layers[1].astype(np.float32))
        np.testing.assert_array_equal(layer.rows(2, 5),
                                      layers[1].reshape(-1, 5)[2:5].astype(np.float32))
        assert layer.rows(2, 5).dtype == np.float32


@pytest.mark.parametrize("fmt", FORMATS)
def test_different_widths_allowed_per_layer(tmp_path, fmt):
    rng = np.random.default_rng(3)
    layers = _layers(rng, (2, 3), widths=(4, 7, 2))
    with load_dump(save_dump(tmp_path / f"d.{fmt}", layers)) as dump:
        assert [dump.width(i) for i in range(3)] == [4, 7, 2]
        for (start, stop, arrs) in dump.iter_chunks(4):
            for arr, ref in zip(arrs, layers, strict=True):
                np.testing.assert_array_equal(arr, ref.reshape(6, -1)[start:stop])


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(4)
    meta = {"model": "bert-base-uncased", "note": "ünïcode, \"quotes\""}
    path = save_dump(tmp_path / f"d.{fmt}", _layers(rng, (4,)), metadata=meta)
    with load_dump(path) as dump:
        assert dump.metadata == meta
        assert "__metadata__" not in dump.extra_keys


@pytest.mark.parametrize("fmt", FORMATS)
def test_mask_dtypes_read_as_bool(tmp_path, fmt):
    rng = np.random.default_rng(5)
    layers = _layers(rng, (2, 3))
    for mask in ([[1, 0, 1], [1, 1, 0]], np.array([[True, False, True], [True, True, False]]),
                 np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])):
        path = tmp_path / f"d.{fmt}"
        _write_raw(path, {"hidden_states.0": layers[0], "attention_mask": np.asarray(mask)})
        with load_dump(path) as dump:
            np.testing.assert_array_equal(dump.attention_mask, np.asarray(mask).astype(bool))


@pytest.mark.parametrize("fmt", FORMATS)
def test_saved_mask_is_uint8(tmp_path, fmt):
    rng = np.random.default_rng(6)
    path = save_dump(tmp_path / f"d.{fmt}", _layers(rng, (2, 3)), np.ones((2, 3), np.int64))
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            assert z["attention_mask"].dtype == np.uint8
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            assert f.get_slice("attention_mask").get_dtype() == "U8"


@pytest.mark.parametrize("fmt", FORMATS)
def test_extra_keys_are_listed_and_ignored(tmp_path, fmt):
    rng = np.random.default_rng(7)
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {"hidden_states.0": _layers(rng, (3,))[0],
                      "input_ids": np.arange(3), "logits": np.zeros((3, 2))})
    with load_dump(path) as dump:
        assert dump.extra_keys == ("input_ids", "logits")
        assert dump.n_layers == 1


def test_convert_between_formats(tmp_path):
    rng = np.random.default_rng(8)
    layers = _layers(rng, (2, 5), widths=(3, 4))
    mask = _mask(rng, (2, 5))
    with load_dump(save_dump(tmp_path / "a.npz", layers, mask)) as src:
        save_dump(tmp_path / "b.safetensors", src.layers, src.attention_mask)
    with load_dump(tmp_path / "b.safetensors") as dst:
        for layer, ref in zip(dst.layers, layers, strict=True):
            np.testing.assert_array_equal(np.asarray(layer), ref)
        np.testing.assert_array_equal(dst.attention_mask, mask.astype(bool))


@pytest.mark.parametrize("fmt", FORMATS)
def test_stacked_flag_overrides_input_form(tmp_path, fmt):
    rng = np.random.default_rng(9)
    layers = _layers(rng, (4,))
    with load_dump(save_dump(tmp_path / f"a.{fmt}", layers, stacked=True)) as dump:
        assert dump.stacked
    with load_dump(save_dump(tmp_path / f"b.{fmt}", np.stack(layers), stacked=False)) as dump:
        assert not dump.stacked
        np.testing.assert_array_equal(np.asarray(dump.layers[2]), layers[2])


def test_extension_is_case_insensitive(tmp_path):
    rng = np.random.default_rng(10)
    with load_dump(save_dump(tmp_path / "D.SafeTensors", _layers(rng, (3,)))) as dump:
        assert dump.format == "safetensors"


def test_dump_pickles_by_path(tmp_path):
    rng = np.random.default_rng(11)
    layers = _layers(rng, (2, 3))
    with load_dump(save_dump(tmp_path / "d.safetensors", layers)) as dump:
        again = pickle.loads(pickle.dumps(dump))
    with again:
        np.testing.assert_array_equal(np.asarray(again.layers[1]), layers[1])


# --------------------------------------------------------------------------- lazy reads


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("lead", [(9,), (3, 4), (1, 7)])
def test_rows_equal_full_array_slices(tmp_path, fmt, stacked, lead):
    rng = np.random.default_rng(12)
    layers = _layers(rng, lead, widths=(3, 3))
    given = np.stack(layers) if stacked else layers
    with load_dump(save_dump(tmp_path / f"d.{fmt}", given)) as dump:
        n = dump.n_rows
        for i, layer in enumerate(dump.layers):
            flat = layers[i].reshape(n, -1)
            for start in range(n + 1):
                for stop in range(start, n + 1):
                    got = layer.rows(start, stop)
                    assert got.shape == (stop - start, 3)
                    np.testing.assert_array_equal(got, flat[start:stop])


def test_safetensors_rows_read_only_the_requested_rows(tmp_path):
    """Every byte read from the file belongs to a requested row (B·T layers included)."""
    rng = np.random.default_rng(13)
    layers = _layers(rng, (4, 6), widths=(3, 3))
    for stacked in (False, True):
        given = np.stack(layers) if stacked else layers
        with load_dump(save_dump(tmp_path / f"d{stacked}.safetensors", given)) as dump:
            source = dump._source
            real_get = source.get
            read = []

            def spy(key, index, real_get=real_get, read=read):
                arr = real_get(key, index)
                read.append(arr.size)
                return arr

            source.get = spy
            for start, stop in [(0, 24), (5, 6), (5, 19), (6, 12), (7, 11), (0, 1), (23, 24)]:
                read.clear()
                dump.layers[1].rows(start, stop)
                assert sum(read) == (stop - start) * 3, (start, stop)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lead", [(10,), (3, 4)])
def test_iter_chunks_covers_every_row_once(tmp_path, fmt, lead):
    rng = np.random.default_rng(14)
    layers = _layers(rng, lead, widths=(2, 3, 4))
    mask = _mask(rng, lead)
    with load_dump(save_dump(tmp_path / f"d.{fmt}", layers, mask)) as dump:
        n = dump.n_rows
        for chunk in (1, 3, n - 1, n, n + 5):
            seen = np.zeros(n, dtype=int)
            prev_stop = 0
            for start, stop, arrs in dump.iter_chunks(chunk, layers=[2, 0]):
                assert start == prev_stop and 0 < stop - start <= chunk
                prev_stop = stop
                seen[start:stop] += 1
                assert [a.shape for a in arrs] == [(stop - start, 4), (stop - start, 2)]
                np.testing.assert_array_equal(arrs[0], layers[2].reshape(n, -1)[start:stop])
                np.testing.assert_array_equal(arrs[1], layers[0].reshape(n, -1)[start:stop])
                np.testing.assert_array_equal(dump.mask_rows(start, stop),
                                              mask.reshape(-1)[start:stop].astype(bool))
            assert prev_stop == n and (seen == 1).all()


def test_iter_chunks_default_all_layers_and_no_mask(tmp_path):
    rng = np.random.default_rng(15)
    layers = _layers(rng, (5,))
    with load_dump(save_dump(tmp_path / "d.safetensors", layers)) as dump:
        chunks = list(dump.iter_chunks(2))
        assert [(a, b) for a, b, _ in chunks] == [(0, 2), (2, 4), (4, 5)]
        assert all(len(arrs) == 3 for _, _, arrs in chunks)
        assert dump.mask_rows(0, 5) is None


def test_safetensors_iter_chunks_streams_chunk_sized_arrays(tmp_path):
    """Peak memory of a pass is a few chunks, not a layer (let alone the dump)."""
    n, d, n_layers, chunk = 20_000, 64, 4, 500
    rng = np.random.default_rng(16)
    layers = [rng.standard_normal((n, d)).astype(np.float32) for _ in range(n_layers)]
    for stacked in (False, True):
        path = save_dump(tmp_path / f"big{stacked}.safetensors",
                         np.stack(layers) if stacked else layers)
        layer_bytes = n * d * 4
        with load_dump(path) as dump:
            tracemalloc.start()
            try:
                total = 0.0
                for start, stop, arrs in dump.iter_chunks(chunk):
                    assert all(a.shape == (stop - start, d) for a in arrs)
                    total += sum(float(a[:, 0].sum()) for a in arrs)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert peak < layer_bytes / 2, f"peak {peak} B vs one layer {layer_bytes} B"
        assert total == pytest.approx(sum(float(x[:, 0].sum()) for x in layers), rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    stacked=st.booleans(),
    lead=st.one_of(st.tuples(st.integers(1, 12)),
                   st.tuples(st.integers(1, 4), st.integers(1, 5))),
    n_layers=st.integers(1, 3),
    chunk=st.integers(1, 25),
    seed=st.integers(0, 2**16),
)
def test_iter_chunks_property(fmt, stacked, lead, n_layers, chunk, seed):
    rng = np.random.default_rng(seed)
    layers = _layers(rng, lead, widths=(3,) * n_layers, dtype=np.float64)
    mask = rng.integers(0, 2, size=lead)
    with tempfile.TemporaryDirectory() as tmp:
        given_layers = np.stack(layers) if stacked else layers
        with load_dump(save_dump(Path(tmp) / f"d.{fmt}", given_layers, mask)) as dump:
            n = dump.n_rows
            got = [[] for _ in range(n_layers)]
            got_mask = []
            for start, stop, arrs in dump.iter_chunks(chunk):
                for k, a in enumerate(arrs):
                    got[k].append(a)
                got_mask.append(dump.mask_rows(start, stop))
            for k in range(n_layers):
                np.testing.assert_array_equal(np.concatenate(got[k]), layers[k].reshape(n, -1))
            np.testing.assert_array_equal(np.concatenate(got_mask), mask.reshape(-1) == 1)


# --------------------------------------------------------------------------- inputs untouched


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stacked", [False, True])
def test_loading_never_modifies_the_file(tmp_path, fmt, stacked):
    rng = np.random.default_rng(17)
    layers = _layers(rng, (3, 4))
    path = save_dump(tmp_path / f"d.{fmt}", np.stack(layers) if stacked else layers,
                     _mask(rng, (3, 4)), metadata={"k": "v"})
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an mtime a rewrite would change
    before = _digest(path)
    with load_dump(path) as dump:
        for layer in dump.layers:
            np.asarray(layer)
            layer.rows(1, 7)
        for _ in dump.iter_chunks(5):
            pass
    assert _digest(path) == before


def test_returned_arrays_do_not_alias_the_file(tmp_path):
    rng = np.random.default_rng(18)
    layers = _layers(rng, (6,))
    path = save_dump(tmp_path / "d.safetensors", layers)
    before = _digest(path)
    with load_dump(path) as dump:
        a = dump.layers[0].rows(0, 6)
        a[:] = 0.0  # writable copies: must not reach the file or later reads
        np.testing.assert_array_equal(dump.layers[0].rows(0, 6), layers[0])
    assert _digest(path)[0] == before[0]


# --------------------------------------------------------------------------- load errors


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.h5"
    path.write_bytes(b"whatever")
    with pytest.raises(DumpError, match=r"d\.h5.*unknown dump extension '\.h5'"):
        load_dump(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_dump(tmp_path / "nope.safetensors")


def test_directory_is_refused(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(DumpError, match="is a directory"):
        load_dump(tmp_path / "d.npz")


def test_directory_without_extension_lists_its_dumps(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DumpError, match=r"run is a directory, not a dump file; it holds no "
                                        r"'\.safetensors' or '\.npz' file"):
        load_dump(run)
    layers = [np.ones((3, 2), np.float32)]
    save_dump(run / "teacher.safetensors", layers)
    save_dump(run / "student.npz", layers)
    (run / "notes.txt").write_text("not a dump")
    (run / "old.npz").mkdir()  # a directory, not a dump file
    with pytest.raises(DumpError, match=r"is a directory, not a dump file; pass one of the "
                                        r"dump files in it: student\.npz, teacher\.safetensors$"):
        load_dump(str(run))
    for k in range(12):
        save_dump(run / f"layer{k:02d}.npz", layers)
    with pytest.raises(DumpError, match=r"layer00\.npz, .*, layer09\.npz and 4 more$"):
        load_dump(run)


@pytest.mark.parametrize(("real", "named"), [("npz", "safetensors"), ("safetensors", "npz")])
def test_wrong_extension_for_content(tmp_path, real, named):
    rng = np.random.default_rng(19)
    save_dump(tmp_path / f"d.{real}", _layers(rng, (3,)))
    wrong = tmp_path / f"wrong.{named}"
    os.replace(tmp_path / f"d.{real}", wrong)
    with pytest.raises(DumpError, match=rf"wrong\.{named}: not a valid"):
        load_dump(wrong)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stacked", [False, True])
def test_truncated_file(tmp_path, fmt, stacked):
    rng = np.random.default_rng(20)
    layers = _layers(rng, (4, 8))
    path = save_dump(tmp_path / f"d.{fmt}", np.stack(layers) if stacked else layers)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DumpError, match=rf"d\.{fmt}.*truncated or corrupt"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_file(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(b"")
    with pytest.raises(DumpError, match="truncated or corrupt"):
        load_dump(path)


@pytest.mark.parametrize("n_rows", [50, 2000])  # small: seen at load; large: at read
def test_corrupt_npz_member_names_the_key(tmp_path, n_rows):
    """Damage inside a member is caught (at load or at read), naming the key."""
    rng = np.random.default_rng(21)
    path = tmp_path / "d.npz"
    layers = _layers(rng, (n_rows,), widths=(8, 8))
    np.savez_compressed(path, **{"hidden_states.0": layers[0], "hidden_states.1": layers[1]})
    data = bytearray(path.read_bytes())
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("hidden_states.1.npy")
    # Flip bytes in the middle of the compressed payload (past the local header).
    mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    for k in range(mid, mid + 16):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DumpError, match=r"d\.npz: .*key 'hidden_states\.1'"):
        with load_dump(path) as dump:
            np.asarray(dump.layers[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_hidden_states_lists_keys(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {"hidden": np.zeros((2, 3), np.float32), "mask": np.ones(2)})
    with pytest.raises(DumpError, match=r"no hidden states.*keys found: 'hidden', 'mask'"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_both_forms_are_ambiguous(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    x = np.zeros((2, 3, 4), np.float32)
    _write_raw(path, {"hidden_states": x, "hidden_states.0": x[0]})
    with pytest.raises(DumpError, match="ambiguous"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_layer_gap(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    x = np.zeros((3, 4), np.float32)
    _write_raw(path, {"hidden_states.0": x, "hidden_states.2": x})
    with pytest.raises(DumpError, match=r"gaps: 'hidden_states\.1' missing"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", ["hidden_states.01", "hidden_states.x", "hidden_states."])
def test_malformed_layer_key(tmp_path, fmt, key):
    path = tmp_path / f"d.{fmt}"
    x = np.zeros((3, 4), np.float32)
    _write_raw(path, {"hidden_states.0": x, key: x})
    with pytest.raises(DumpError, match=rf"unexpected key '{key}'"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ragged_layers(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {"hidden_states.0": np.zeros((2, 3, 4), np.float32),
                      "hidden_states.1": np.zeros((2, 5, 4), np.float32)})
    with pytest.raises(DumpError, match=r"ragged layers: key 'hidden_states\.1' has shape "
                                        r"\(2, 5, 4\)"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_2d_3d_layers_are_ragged(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {"hidden_states.0": np.zeros((6, 4), np.float32),
                      "hidden_states.1": np.zeros((2, 3, 4), np.float32)})
    with pytest.raises(DumpError, match="ragged"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("key", "shape"), [("hidden_states", (3, 4)),
                                            ("hidden_states", (2, 1, 2, 3, 4)),
                                            ("hidden_states.0", (4,)),
                                            ("hidden_states.0", (1, 2, 3, 4))])
def test_wrong_ndim(tmp_path, fmt, key, shape):
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {key: np.zeros(shape, np.float32)})
    with pytest.raises(DumpError, match=rf"key '{key}' has shape"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("key", "shape"), [("hidden_states", (2, 0, 4)),
                                            ("hidden_states.0", (3, 0))])
def test_empty_layers(tmp_path, fmt, key, shape):
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {key: np.zeros(shape, np.float32)})
    with pytest.raises(DumpError, match=rf"key '{key}' is empty"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.bool_])
def test_non_float_layers_refused(tmp_path, fmt, dtype):
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {"hidden_states.0": np.ones((3, 4), np.float32),
                      "hidden_states.1": np.ones((3, 4), dtype)})
    with pytest.raises(DumpError, match=r"key 'hidden_states\.1' has dtype .*must be float16"):
        load_dump(path)


def test_bfloat16_refused_with_hint(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    path = tmp_path / "d.safetensors"
    save_file({"hidden_states": torch.zeros(2, 3, 4, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(DumpError, match=r"'hidden_states' is bfloat16.*h\.float\(\)"):
        load_dump(path)


def test_npz_object_array_refused_without_unpickling(tmp_path):
    path = tmp_path / "d.npz"
    evil = np.empty(2, dtype=object)
    evil[0] = np.ones((3, 4))
    evil[1] = {"x": 1}
    np.savez(path, **{"hidden_states.0": np.ones((3, 4), np.float32), "hidden_states.1": evil})
    with pytest.raises(DumpError, match=r"'hidden_states\.1'.*refusing to unpickle: loading "
                                        r"a dump must never run code"):
        load_dump(path)


def test_npz_object_array_refused_at_read_too(tmp_path):
    """Defence in depth: numpy's own refusal is reworded if the header check is bypassed."""
    path = tmp_path / "d.npz"
    np.savez(path, hidden_states=np.empty((2, 3, 4), dtype=object))
    source = _dump_sources.NpzSource(path)
    try:
        with pytest.raises(DumpError, match="refusing to unpickle"):
            source.load("hidden_states")
    finally:
        source.close()


def test_npz_object_extra_key_is_never_loaded(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **{"hidden_states.0": np.ones((3, 4), np.float32),
                      "notes": np.array([{"a": 1}], dtype=object)})
    with load_dump(path) as dump:
        assert dump.extra_keys == ("notes",)


def test_npz_object_mask_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **{"hidden_states.0": np.ones((3, 4), np.float32),
                      "attention_mask": np.array([1, 0, None], dtype=object)})
    with pytest.raises(DumpError, match="'attention_mask' is an object array"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mask_shape", [(3,), (2, 4), (3, 2), (2, 3, 1)])
def test_mask_wrong_shape(tmp_path, fmt, mask_shape):
    path = tmp_path / f"d.{fmt}"
    _write_raw(path, {"hidden_states.0": np.ones((2, 3, 4), np.float32),
                      "attention_mask": np.ones(mask_shape, np.int64)})
    with pytest.raises(DumpError, match=r"key 'attention_mask' has shape .* leading shape "
                                        r"\(2, 3\)"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [2, -1])
def test_mask_wrong_values(tmp_path, fmt, bad):
    path = tmp_path / f"d.{fmt}"
    mask = np.ones((2, 3), np.int64)
    mask[1, 2] = bad
    _write_raw(path, {"hidden_states.0": np.ones((2, 3, 4), np.float32),
                      "attention_mask": mask})
    with pytest.raises(DumpError, match=rf"'attention_mask' must contain only 0 and 1, found "
                                        rf"\[{bad}\]"):
        load_dump(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mask_wrong_dtype(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    mask = np.ones((2, 3), np.complex64)
    _write_raw(path, {"hidden_states.0": np.ones((2, 3, 4), np.float32), "attention_mask": mask})
    with pytest.raises(DumpError, match="attention_mask"):
        load_dump(path)


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array('["not", "a dict"]'),
                                 np.array('{"k": 1}'), np.array("not json")])
def test_npz_bad_metadata(tmp_path, bad):
    path = tmp_path / "d.npz"
    np.savez(path, **{"hidden_states.0": np.ones((3, 4), np.float32), "__metadata__": bad})
    with pytest.raises(DumpError, match="'__metadata__' must hold a JSON object"):
        load_dump(path)


def test_closed_dump_refuses_reads(tmp_path):
    rng = np.random.default_rng(22)
    for fmt in FORMATS:
        dump = load_dump(save_dump(tmp_path / f"d.{fmt}", _layers(rng, (4,))))
        dump.close()
        dump.close()  # idempotent
        with pytest.raises(DumpError, match="closed"):
            dump.layers[0].rows(0, 2)


def test_bad_row_ranges_and_arguments(tmp_path):
    rng = np.random.default_rng(23)
    with load_dump(save_dump(tmp_path / "d.safetensors", _layers(rng, (2, 3)))) as dump:
        layer = dump.layers[0]
        for start, stop in [(-1, 2), (3, 2), (0, 7)]:
            with pytest.raises(ValueError, match=r"row range"):
                layer.rows(start, stop)
        with pytest.raises(TypeError, match="start must be an int"):
            layer.rows(0.5, 2)
        with pytest.raises(ValueError, match="row range"):
            dump.mask_rows(0, 7)
        with pytest.raises(ValueError, match="chunk_rows must be > 0"):
            dump.iter_chunks(0)
        with pytest.raises(TypeError, match="chunk_rows"):
            dump.iter_chunks(2.0)
        with pytest.raises(ValueError, match=r"layers\[1\]=3 is out of range.*3 layer"):
            dump.iter_chunks(2, layers=[0, 3])
        with pytest.raises(ValueError, match="out of range"):
            dump.iter_chunks(2, layers=[-1])
        with pytest.raises(TypeError, match="layers must be a sequence"):
            dump.iter_chunks(2, layers=1)
        with pytest.raises(ValueError, match="out of range"):
            dump.width(3)
        with pytest.raises(ValueError, match="copy cannot be avoided"):
            np.asarray(layer, copy=False)


# --------------------------------------------------------------------------- save errors


def test_save_unknown_extension(tmp_path):
    with pytest.raises(DumpError, match="unknown dump extension '.pt'"):
        save_dump(tmp_path / "d.pt", [np.ones((2, 3), np.float32)])
    assert list(tmp_path.iterdir()) == []


def test_save_ragged_layers(tmp_path):
    with pytest.raises(ValueError, match=r"layers\[1\] has shape \(2, 5, 4\)"):
        save_dump(tmp_path / "d.npz", [np.ones((2, 3, 4)), np.ones((2, 5, 4))])


def test_save_refuses_non_float(tmp_path):
    with pytest.raises(TypeError, match=r"layers\[0\].*float32 or float64.*int64"):
        save_dump(tmp_path / "d.npz", [np.ones((2, 3), np.int64)])


def test_save_refuses_bad_ndim_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r"layers\[0\] must be 2-D or 3-D"):
        save_dump(tmp_path / "d.npz", [np.ones(3)])
    with pytest.raises(ValueError, match="stacked array"):
        save_dump(tmp_path / "d.npz", np.ones((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        save_dump(tmp_path / "d.npz", [])
    with pytest.raises(ValueError, match="non-empty"):
        save_dump(tmp_path / "d.npz", [np.ones((0, 3), np.float16)])


def test_save_bad_mask(tmp_path):
    layers = [np.ones((2, 3, 4), np.float32)]
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 2\)"):
        save_dump(tmp_path / "d.npz", layers, np.ones((3, 2)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        save_dump(tmp_path / "d.npz", layers, np.full((2, 3), 2))
    assert list(tmp_path.iterdir()) == []


def test_save_stacked_needs_one_shape_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="stacked=True needs layers of one shape and dtype"):
        save_dump(tmp_path / "d.npz", [np.ones((2, 3)), np.ones((2, 4))], stacked=True)
    with pytest.raises(ValueError, match="stacked=True"):
        save_dump(tmp_path / "d.npz", [np.ones((2, 3)), np.ones((2, 3), np.float32)],
                  stacked=True)


@pytest.mark.parametrize("meta", [{"a": 1}, {1: "a"}, ["a"], {"__metadata__": "x"}])
def test_save_bad_metadata(tmp_path, meta):
    with pytest.raises((TypeError, ValueError), match="metadata"):
        save_dump(tmp_path / "d.npz", [np.ones((2, 3))], metadata=meta)


def test_save_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_dump(tmp_path / "no" / "d.npz", [np.ones((2, 3))])


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_save_leaves_no_file(tmp_path, monkeypatch, fmt):
    """A writer dying half way leaves neither the target nor a temp file."""

    def half_then_die(*args, **kwargs):
        target = args[1] if fmt == "safetensors" else args[0]
        if isinstance(target, str):
            Path(target).write_bytes(b"partial")
        else:
            target.write(b"partial")
        raise OSError("disk full")

    if fmt == "safetensors":
        import safetensors.numpy

        monkeypatch.setattr(safetensors.numpy, "save_file", half_then_die)
    else:
        monkeypatch.setattr(np, "savez", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        save_dump(tmp_path / f"d.{fmt}", [np.ones((2, 3), np.float32)])
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = save_dump(tmp_path / "d.npz", [np.ones((2, 3), np.float32)])
    before = _digest(path)

    def die(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(np, "savez", die)
    with pytest.raises(RuntimeError):
        save_dump(path, [np.zeros((2, 3), np.float32)])
    assert _digest(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]


def test_atomic_write_success_and_failure(tmp_path):
    target = tmp_path / "out.json"
    seen = []

    def writer(p: Path):
        seen.append(p)
        assert p.parent == tmp_path and p.suffix == ".json" and p != target
        p.write_text("{}")

    assert atomic_write(target, writer) == target
    assert target.read_text() == "{}"
    assert not seen[0].exists()

    def failing(p: Path):
        p.write_text("half")
        raise KeyError("x")

    with pytest.raises(KeyError):
        atomic_write(target, failing)
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_open_text_and_binary(tmp_path):
    with atomic_open(tmp_path / "a.csv", "w", encoding="utf-8", newline="") as f:
        f.write("x,y\n1,2\n")
    assert (tmp_path / "a.csv").read_text(encoding="utf-8") == "x,y\n1,2\n"
    with atomic_open(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ZeroDivisionError), atomic_open(tmp_path / "c.txt") as f:
        f.write("partial")
        1 / 0  # noqa: B018
    assert not (tmp_path / "c.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.bin"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "d.txt", "a"):
            pass


def test_atomic_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "new.txt") as p:
            p.write_text("x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "old.txt").write_text("y")
        os.chmod(tmp_path / "old.txt", 0o600)
        with atomic_path(tmp_path / "old.txt") as p:
            p.write_text("z")
        assert (tmp_path / "old.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


@pytest.mark.parametrize("name", ["x" * 245 + ".json", "é" * 124 + ".json"])
def test_atomic_write_of_a_name_near_the_length_limit(tmp_path, name):
    target = tmp_path / name  # 250–253 bytes: a valid name, no room to spare
    atomic_write(target, lambda p: p.write_text("{}"))
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_write_together_writes_all_or_none(tmp_path):
    old = tmp_path / "a.txt"
    old.write_text("old")

    def failing(p):
        raise OSError("disk full")

    files = {old: lambda p: p.write_text("new"), tmp_path / "new" / "deep" / "b.txt": failing}
    with pytest.raises(OSError, match="disk full"):
        write_together(files)
    assert old.read_text() == "old"  # not replaced: another file failed
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # directories made are removed
    files[tmp_path / "new" / "deep" / "b.txt"] = lambda p: p.write_text("b")
    write_together(files)
    assert old.read_text() == "new" and (tmp_path / "new" / "deep" / "b.txt").read_text() == "b"


def test_atomic_refuses_directory_target(tmp_path):
    with pytest.raises(IsADirectoryError):
        with atomic_path(tmp_path):
            pass


def test_mask_key_selects_another_key(tmp_path):
    path = tmp_path / "d.npz"
    layers = [np.ones((2, 3, 4), dtype=np.float32)]
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.uint8)
    np.savez(path, **{"hidden_states.0": layers[0], "padding": mask})
    dump = load_dump(path, mask_key="padding")
    np.testing.assert_array_equal(dump.attention_mask, mask.astype(bool))
    assert "padding" not in dump.extra_keys
    assert load_dump(path).attention_mask is None


def test_pickled_dump_keeps_its_mask_key(tmp_path):
    path = tmp_path / "d.safetensors"
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.uint8)
    st_save_file({"hidden_states.0": np.ones((2, 3, 4), dtype=np.float32), "padding": mask},
                 str(path))
    with load_dump(path, mask_key="padding") as dump:
        again = pickle.loads(pickle.dumps(dump))
    with again:
        np.testing.assert_array_equal(again.attention_mask, mask.astype(bool))
        assert again.mask_key == "padding"
        assert again.extra_keys == ()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stacked", [False, True])
def test_np_array_of_a_layer_is_a_writable_copy(tmp_path, fmt, stacked):
    rng = np.random.default_rng(19)
    layers = _layers(rng, (6,))
    with load_dump(save_dump(tmp_path / f"d.{fmt}", layers, stacked=stacked)) as dump:
        for copy in (np.array(dump.layers[0]), np.array(dump.layers[0], dtype=np.float64)):
            copy -= copy.mean(0)  # in place: must not reach the dump's cache
            np.testing.assert_array_equal(dump.layers[0].read(), layers[0])
        with pytest.raises(ValueError, match="a copy cannot be avoided"):
            np.array(dump.layers[0], copy=False)


# --------------------------------------------------------------------------- array-like dumps

INDEX_KEYS = [0, -1, 2, slice(None), slice(1, 3), slice(None, None, 2), slice(None, None, -1),
              slice(4, 0, -2), slice(5, 2), slice(-2, None), (1, 2), (slice(0, 2), -1),
              (slice(None), slice(1, 4)), (Ellipsis, 0), (1, Ellipsis), (2, 3, slice(1, 3)),
              (slice(1, 3), slice(None), 4), ()]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stacked", [False, True])
def test_lazy_layer_indexing_equals_numpy(tmp_path, fmt, stacked):
    rng = np.random.default_rng(21)
    layers = _layers(rng, (5, 6), widths=(7, 7))
    given = np.stack(layers) if stacked else layers
    with load_dump(save_dump(tmp_path / f"d.{fmt}", given)) as dump:
        layer = dump.layers[1]
        assert len(layer) == 5 and layer.shape == (5, 6, 7) and layer.ndim == 3
        assert layer.dtype == np.float32
        for key in INDEX_KEYS:
            got = layer[key]
            want = layers[1][key]
            assert got.shape == want.shape and got.dtype == want.dtype, key
            np.testing.assert_array_equal(got, want, err_msg=str(key))
        np.testing.assert_array_equal(np.stack(list(layer)), layers[1])  # iteration by row


def test_lazy_layer_2d_indexing(tmp_path):
    rng = np.random.default_rng(22)
    layers = _layers(rng, (9,), widths=(4,))
    with load_dump(save_dump(tmp_path / "d.safetensors", layers)) as dump:
        for key in [3, -9, slice(2, 7), slice(None, None, 3), (slice(1, 4), 2)]:
            np.testing.assert_array_equal(dump[0][key], layers[0][key])


def test_lazy_layer_getitem_reads_only_the_covering_rows(tmp_path):
    rng = np.random.default_rng(23)
    layers = _layers(rng, (40, 3), widths=(2,))
    with load_dump(save_dump(tmp_path / "d.safetensors", layers)) as dump:
        read = []
        real_get = dump._source.get
        dump._source.get = lambda key, index: read.append(real_get(key, index).size) or \
            real_get(key, index)
        for key, rows in [(slice(0, 10), 10), (7, 1), (slice(30, 40, 3), 10), (-1, 1)]:
            read.clear()
            dump[0][key]
            assert read == [rows * 3 * 2], key


@pytest.mark.parametrize("key", [5, -6, (0, 6), (0, 0, 0, 0)])
def test_lazy_layer_index_out_of_range(tmp_path, key):
    rng = np.random.default_rng(24)
    with load_dump(save_dump(tmp_path / "d.safetensors", _layers(rng, (5, 6)))) as dump:
        with pytest.raises(IndexError, match="out of bounds|too many indices"):
            dump[0][key]


@pytest.mark.parametrize("key", [[0, 1], np.array([0, 2]), np.ones(5, dtype=bool), 1.5, True,
                                 "a", None])
def test_lazy_layer_refuses_fancy_indices(tmp_path, key):
    rng = np.random.default_rng(25)
    with load_dump(save_dump(tmp_path / "d.safetensors", _layers(rng, (5, 6)))) as dump:
        with pytest.raises(TypeError, match="ints or slices.*np.asarray"):
            dump[0][key]


def test_dump_is_a_sequence_of_layers(tmp_path):
    rng = np.random.default_rng(26)
    layers = _layers(rng, (3, 4), widths=(2, 3, 4))
    with load_dump(save_dump(tmp_path / "d.safetensors", layers)) as dump:
        assert len(dump) == 3
        assert dump[0] is dump.layers[0] and dump[-1] is dump.layers[2]
        assert dump[1:] == dump.layers[1:]
        assert [layer.width for layer in dump] == [2, 3, 4]
        np.testing.assert_array_equal(dump[2][:2], layers[2][:2])


# --------------------------------------------------------------------------- metadata


def test_dump_metadata_properties(tmp_path):
    rng = np.random.default_rng(27)
    meta = {"embeddings_index": "0", "texts_sha256": "ab" * 32, "n_texts": "3"}
    with load_dump(save_dump(tmp_path / "d.npz", _layers(rng, (3,)), metadata=meta)) as dump:
        assert dump.embeddings_index == 0 and dump.has_embeddings is True
        assert dump.texts_sha256 == "ab" * 32 and dump.n_texts == 3
    with load_dump(save_dump(tmp_path / "e.safetensors", _layers(rng, (3,)))) as dump:
        assert dump.embeddings_index is None and dump.has_embeddings is None
        assert dump.texts_sha256 is None and dump.n_texts is None
    meta = {"embeddings_index": "none"}
    with load_dump(save_dump(tmp_path / "f.safetensors", _layers(rng, (3,)), metadata=meta)) \
            as dump:
        assert dump.embeddings_index is None and dump.has_embeddings is False


@pytest.mark.parametrize(("meta", "message"), [({"embeddings_index": "x"}, "non-negative"),
                                               ({"embeddings_index": "-1"}, "non-negative"),
                                               ({"embeddings_index": "3"}, "has 3 layer"),
                                               ({"n_texts": "1.5"}, "n_texts")])
def test_bad_metadata_values(tmp_path, meta, message):
    rng = np.random.default_rng(28)
    with load_dump(save_dump(tmp_path / "d.safetensors", _layers(rng, (3,)), metadata=meta)) \
            as dump, pytest.raises(DumpError, match=message):
        dump.embeddings_index if "embeddings_index" in meta else dump.n_texts  # noqa: B018


def test_check_same_texts(tmp_path):
    rng = np.random.default_rng(29)

    def dump(name, lead=(4,), **meta):
        return load_dump(save_dump(tmp_path / name, _layers(rng, lead), metadata=meta))

    a = dump("a.safetensors", texts_sha256="1" * 64, n_texts="4", texts_file="x.txt")
    b = dump("b.safetensors", texts_sha256="1" * 64, n_texts="4")
    c = dump("c.safetensors", texts_sha256="2" * 64, n_texts="4", texts_file="y.txt")
    d = dump("d.safetensors")
    e = dump("e.safetensors", lead=(5,))
    f = dump("f.safetensors", texts_sha256="1" * 64, n_texts="5")
    assert io.check_same_texts(a, b) is True
    assert io.check_same_texts(a, d) is False  # d says nothing: rows compared only
    with pytest.raises(DumpError, match=r"different texts.*a.safetensors.*x.txt.*c.safetensors"):
        io.check_same_texts(a, c)
    with pytest.raises(DumpError, match="different rows.*e.safetensors"):
        io.check_same_texts(d, e)
    with pytest.raises(DumpError, match="different texts.*4 texts.*5 texts"):
        io.check_same_texts(a, f)
    with pytest.raises(TypeError, match="pkd.io.Dump"):
        io.check_same_texts(a, "b.safetensors")
    for x in (a, b, c, d, e, f):
        x.close()


# --------------------------------------------------------------------------- DumpWriter


def _batches(rng, sizes, lengths, widths=(6, 4), dtype=np.float32):
    for b, t in zip(sizes, lengths, strict=True):
        mask = np.arange(t) < rng.integers(1, t + 1, size=(b, 1))
        yield [rng.standard_normal((b, t, d)).astype(dtype) for d in widths], mask


@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
def test_dump_writer_pads_batches_to_seq_len(tmp_path, side, wait):
    rng = np.random.default_rng(30)
    batches = list(_batches(rng, [3, 2, 4], [5, 7, 2]))
    path = tmp_path / "w.safetensors"
    with io.DumpWriter(path, 9, seq_len=7, metadata={"k": "v"}, padding_side=side) as writer:
        for layers, mask in batches:
            writer.append(layers, attention_mask=mask, wait=wait)
    # Witness: the padded arrays built here, written by safetensors' own writer and read back.
    want, want_mask = [np.zeros((9, 7, d), np.float32) for d in (6, 4)], np.zeros((9, 7), bool)
    row = 0
    for layers, mask in batches:
        b, t = mask.shape
        cols = slice(0, t) if side == "right" else slice(7 - t, 7)
        for w, x in zip(want, layers, strict=True):
            w[row:row + b, cols] = x
        want_mask[row:row + b, cols] = mask
        row += b
    from safetensors import safe_open
    from safetensors.numpy import load_file

    raw = load_file(path)
    np.testing.assert_array_equal(raw["hidden_states.0"], want[0])
    np.testing.assert_array_equal(raw["hidden_states.1"], want[1])
    np.testing.assert_array_equal(raw["attention_mask"], want_mask.astype(np.uint8))
    assert raw["attention_mask"].dtype == np.uint8
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"k": "v"}
    with load_dump(path) as dump:
        np.testing.assert_array_equal(dump.attention_mask, want_mask)
        np.testing.assert_array_equal(dump[1][:], want[1])


def test_dump_writer_casts_a_short_batch_into_its_padded_block(tmp_path):
    """A later float64 batch, shorter than seq_len, is rounded to the first batch's float16."""
    rng = np.random.default_rng(36)
    first = rng.standard_normal((2, 5, 3)).astype(np.float16)
    later = rng.standard_normal((3, 2, 3))  # float64, 2 of 5 positions, left padding
    path = tmp_path / "c.safetensors"
    with io.DumpWriter(path, 5, seq_len=5, padding_side="left") as writer:
        writer.append([first], attention_mask=np.ones((2, 5)))
        writer.append([later], attention_mask=np.ones((3, 2)))
    from safetensors.numpy import load_file

    want = np.zeros((5, 5, 3), np.float16)
    want[:2], want[2:, 3:] = first, later.astype(np.float16)
    raw = load_file(path)
    assert raw["hidden_states.0"].dtype == np.float16
    np.testing.assert_array_equal(raw["hidden_states.0"], want)
    np.testing.assert_array_equal(raw["attention_mask"][2:], [[0, 0, 0, 1, 1]] * 3)


def _sync_threads() -> list[threading.Thread]:
    """DumpWriter's threads still alive: the flushing one and the writing one."""
    return [t for t in threading.enumerate() if t.name in ("pkd-sync", "pkd-write")]


def test_dump_writer_flushes_in_the_background_and_fsyncs_before_the_rename(tmp_path,
                                                                             monkeypatch):
    """Written batches are fdatasync'ed by the pkd-sync thread; close() still fsyncs first."""
    monkeypatch.setattr(_atomic, "SYNC_EVERY_BYTES", 1000)
    events, fdatasync, fsync, replace = [], os.fdatasync, os.fsync, os.replace

    def recording_fdatasync(fd):
        events.append(("fdatasync", threading.current_thread().name, os.fstat(fd).st_ino))
        fdatasync(fd)

    def recording_fsync(fd):
        events.append(("fsync", threading.current_thread().name, os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", threading.current_thread().name, os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    rng = np.random.default_rng(37)
    path = tmp_path / "s.safetensors"
    batches = list(_batches(rng, [4, 4, 4, 4], [6, 3, 6, 5]))
    with io.DumpWriter(path, 16, seq_len=6) as writer:
        for layers, mask in batches:
            writer.append(layers, attention_mask=mask)
            for _ in range(200):  # the model's forward, during which the thread flushes
                if any(e[0] == "fdatasync" for e in events):
                    break
                threading.Event().wait(0.01)
        assert len(_sync_threads()) == 2
    inode = path.stat().st_ino
    background = [e for e in events if e[0] == "fdatasync"]
    assert background and all(e[1:] == ("pkd-sync", inode) for e in background)
    final = events.index(("fsync", "MainThread", inode))  # the file's own, in close()
    assert events.index(("replace", "MainThread", inode)) > final
    assert not [e for e in events[final:] if e[0] == "fdatasync"]  # the thread ended first
    assert _sync_threads() == []
    with load_dump(path) as dump:
        assert dump.lead_shape == (16, 6)


def test_dump_writer_writes_in_its_thread_one_batch_in_flight(tmp_path, monkeypatch):
    """wait=False returns before the batch is written; the next append waits for it."""
    gate, written, pwrite = threading.Event(), [], os.pwrite

    def gated_pwrite(fd, data, offset):
        if threading.current_thread().name == "pkd-write":
            assert gate.wait(10)
        n = pwrite(fd, data, offset)
        written.append((threading.current_thread().name, offset))
        return n

    monkeypatch.setattr(os, "pwrite", gated_pwrite)
    rng = np.random.default_rng(39)
    batches = list(_batches(rng, [3, 3], [4, 2], widths=(5, 2, 3)))
    path = tmp_path / "b.safetensors"
    with io.DumpWriter(path, 6, seq_len=4) as writer:
        writer.append(*batches[0], wait=False)
        assert [name for name, _ in written] == ["MainThread"]  # the header; the batch waits
        threading.Timer(0.2, gate.set).start()
        writer.append(*batches[1], wait=False)
        # Returned: the first batch's 3 layers and mask were written by the thread.
        assert [name for name, _ in written[1:5]] == ["pkd-write"] * 4
    assert len(written) == 9 and {name for name, _ in written[1:]} == {"pkd-write"}
    with load_dump(path) as dump:
        np.testing.assert_array_equal(dump[0][3:, :2], batches[1][0][0])
        np.testing.assert_array_equal(dump[2][:3], batches[0][0][2])


def test_a_failed_background_write_fails_the_dump_and_an_abort_drops_the_queue(tmp_path,
                                                                               monkeypatch):
    pwrite = os.pwrite

    def full(fd, data, offset):
        if threading.current_thread().name == "pkd-write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    rng = np.random.default_rng(40)
    path = tmp_path / "n.safetensors"
    with pytest.raises(OSError, match="n.safetensors: writing failed: No space left"):
        with io.DumpWriter(path, 8, seq_len=4) as writer:
            for layers, mask in _batches(rng, [4, 4], [4, 2]):
                writer.append(layers, attention_mask=mask, wait=False)
    assert list(tmp_path.iterdir()) == [] and _sync_threads() == []
    monkeypatch.setattr(os, "pwrite", pwrite)
    entered, gate, calls = threading.Event(), threading.Event(), []

    def held(*args):
        entered.set()
        calls.append(gate.wait(10))

    monkeypatch.setattr(_atomic, "write_at", held)
    with pytest.raises(KeyboardInterrupt), io.DumpWriter(path, 8, seq_len=4) as writer:
        writer.append(*next(_batches(rng, [4], [4])), wait=False)  # 3 writes, held at the gate
        assert entered.wait(10)
        threading.Timer(0.2, gate.set).start()
        raise KeyboardInterrupt
    assert calls == [True]  # the write under way finished, the 2 queued were dropped
    assert list(tmp_path.iterdir()) == [] and _sync_threads() == []


def test_a_failed_background_flush_fails_the_dump(tmp_path, monkeypatch):
    """An I/O error of the flush thread is raised, and no file is left (nor a thread)."""
    monkeypatch.setattr(_atomic, "SYNC_EVERY_BYTES", 1)
    failed = threading.Event()

    def failing(fd):
        failed.set()
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    rng = np.random.default_rng(38)
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="f.safetensors: flushing to disk failed: Input/output"):
        with io.DumpWriter(path, 8, seq_len=4) as writer:
            for layers, mask in _batches(rng, [4, 4], [4, 2]):
                writer.append(layers, attention_mask=mask)
                assert failed.wait(10)  # the thread tried (a stop before it would skip it)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]
    assert _sync_threads() == []


def test_dump_writer_pooled_rows_and_dtypes(tmp_path):
    rng = np.random.default_rng(31)
    rows = [[rng.standard_normal((n, 3)).astype(np.float16),
             rng.standard_normal((n, 5))] for n in (4, 1, 2)]
    path = tmp_path / "p.safetensors"
    writer = io.DumpWriter(path, 7)
    for layers in rows:
        writer.append(layers)
    assert not path.exists()  # only once closed
    assert writer.close() == path
    with load_dump(path) as dump:
        assert dump.lead_shape == (7,) and dump.attention_mask is None
        assert dump[0].stored_dtype == np.float16 and dump[1].dtype == np.float64
        np.testing.assert_array_equal(dump[0][:], np.concatenate([r[0] for r in rows]))
        np.testing.assert_array_equal(dump[1][:], np.concatenate([r[1] for r in rows]))


def test_dump_writer_without_seq_len_takes_the_first_batch(tmp_path):
    rng = np.random.default_rng(32)
    path = tmp_path / "w.safetensors"
    with io.DumpWriter(path, 4) as writer:
        writer.append(_layers(rng, (2, 3)))
        with pytest.raises(ValueError, match="needs an attention_mask"):
            writer.append(_layers(rng, (2, 2)))
        with pytest.raises(ValueError, match="longer than seq_len=3"):
            writer.append(_layers(rng, (2, 4)), attention_mask=np.ones((2, 4)))
        writer.append(_layers(rng, (2, 3)))
    with load_dump(path) as dump:
        assert dump.lead_shape == (4, 3)


def test_dump_writer_refuses_inconsistent_batches(tmp_path):
    rng = np.random.default_rng(33)
    path = tmp_path / "w.safetensors"
    writer = io.DumpWriter(path, 6, seq_len=4)
    writer.append(_layers(rng, (2, 4), widths=(3, 3)), attention_mask=np.ones((2, 4)))
    cases = [
        ((_layers(rng, (2, 4), widths=(3,)), np.ones((2, 4))), "1 layers, but the first batch"),
        ((_layers(rng, (2, 4), widths=(3, 5)), np.ones((2, 4))), r"layers\[1\] has shape"),
        ((_layers(rng, (2,), widths=(3, 3)), np.ones(2)), r"layers\[0\] has shape"),
        ((_layers(rng, (2, 4), widths=(3, 3)), None), "attention_mask is missing"),
        ((_layers(rng, (5, 4), widths=(3, 3)), np.ones((5, 4))), "exceed n_rows=6"),
        ((_layers(rng, (2, 4), widths=(3, 3)), np.full((2, 4), 2)), "only 0 and 1"),
    ]
    for (layers, mask), message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            writer.append(layers, attention_mask=mask)
    assert writer.rows_written == 2  # refused batches wrote nothing
    with pytest.raises(DumpError, match="2 of n_rows=6 rows were appended; nothing written"):
        writer.close()
    assert sorted(tmp_path.iterdir()) == []


def test_dump_writer_leaves_nothing_on_error_and_keeps_an_old_file(tmp_path):
    rng = np.random.default_rng(34)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), io.DumpWriter(path, 4) as writer:
        writer.append(_layers(rng, (2,)))
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert _sync_threads() == []  # the flush thread ended with the writer
    writer = io.DumpWriter(tmp_path / "x.safetensors", 4)
    writer.append(_layers(rng, (2,)))
    del writer  # dropped without close: its temporary file goes too
    import gc

    gc.collect()
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_dump_writer_argument_errors(tmp_path):
    with pytest.raises(DumpError, match=r"\.safetensors only"):
        io.DumpWriter(tmp_path / "a.npz", 3)
    with pytest.raises(ValueError, match="n_rows"):
        io.DumpWriter(tmp_path / "a.safetensors", 0)
    with pytest.raises(ValueError, match="padding_side"):
        io.DumpWriter(tmp_path / "a.safetensors", 3, padding_side="middle")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.DumpWriter(tmp_path / "no" / "a.safetensors", 3)
    assert list(tmp_path.iterdir()) == []


def test_dump_writer_memory_is_one_batch(tmp_path):
    """Peak traced memory of 10 and 100 batches agree: nothing grows with the dump."""
    def peak(n_batches: int) -> int:
        rng = np.random.default_rng(35)
        path = tmp_path / f"m{n_batches}.safetensors"
        tracemalloc.start()
        with io.DumpWriter(path, 32 * n_batches, seq_len=24, padding_side="left") as writer:
            for _ in range(n_batches):
                t = int(rng.integers(8, 25))
                mask = np.arange(t) < rng.integers(1, t + 1, size=(32, 1))
                writer.append([rng.standard_normal((32, t, 64), dtype=np.float32)
                               for _ in range(5)], attention_mask=mask)
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert path.stat().st_size > n_batches * 32 * 24 * 64 * 4 * 5
        return result

    small, large = peak(10), peak(100)
    batch_bytes = 5 * 32 * 24 * 64 * 4
    assert large < 1.1 * small, (small, large)
    assert large < 3 * batch_bytes, (large, batch_bytes)


# --------------------------------------------------------------------------- torch tensors


def test_save_dump_says_how_to_pass_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    hidden = tuple(torch.zeros(2, 3, 4) for _ in range(3))
    for layers, mask in [(hidden, None), (torch.zeros(3, 2, 3, 4), None),
                         ([h.numpy() for h in hidden], torch.ones(2, 3))]:
        with pytest.raises(TypeError, match=r"h\.float\(\)\.cpu\(\)\.numpy\(\).*pkd\.hf"):
            save_dump(tmp_path / "d.safetensors", layers, attention_mask=mask)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- projections


def _fit_cli(tmp_path, *extra):
    from pkd.cli import main

    rng = np.random.default_rng(36)
    mask = np.arange(6) < rng.integers(2, 7, size=(10, 1))
    save_dump(tmp_path / "s.safetensors", _layers(rng, (10, 6), widths=(4, 4, 4)), mask)
    save_dump(tmp_path / "t.safetensors", _layers(rng, (10, 6), widths=(5,) * 4), mask)
    out = tmp_path / "fit"
    assert main(["fit", str(tmp_path / "s.safetensors"), str(tmp_path / "t.safetensors"),
                 "--mapping", "0:1,2:3", "--out", str(out), *extra]) == 0
    return out / "projection.safetensors"


@pytest.mark.parametrize("shared", [True, False])
def test_load_projection_from_pkd_fit(tmp_path, shared):
    import pkd

    path = _fit_cli(tmp_path, *(() if shared else ("--per-pair",)))
    loaded = io.load_projection(path)
    assert loaded.shared is shared and loaded.mapping == [(0, 1), (2, 3)]
    with load_dump(tmp_path / "s.safetensors") as s, load_dump(tmp_path / "t.safetensors") as t:
        fit = pkd.fit_projection(s, t, loaded.mapping, shared=shared)
    if shared:
        np.testing.assert_array_equal(loaded.projection, fit.projection)
    else:
        assert list(loaded.projection) == [(0, 1), (2, 3)]
        for pair, P in loaded.projection.items():
            np.testing.assert_array_equal(P, fit.projections[pair])
    config = pkd.ProgressiveDistillation(loaded.mapping, projection=loaded.projection,
                                         project="always")
    assert config.shared_projection is shared


def test_load_projection_errors(tmp_path):
    P = np.zeros((2, 3), np.float32)
    cases = {
        "none.safetensors": ({"other": P}, None, "unexpected key 'other'"),
        "both.safetensors": ({"projection": P, "projection.0_1": P}, None, "expected one key"),
        "empty.safetensors": ({}, None, "expected one key"),
        "badmap.safetensors": ({"projection": P}, {"mapping": "[[0]]"}, "JSON list of"),
        "mismatch.safetensors": ({"projection.0_1": P}, {"mapping": "[[0, 2]]"}, "do not match"),
        "ndim.safetensors": ({"projection": np.zeros(3, np.float32)}, None, "2-D float"),
    }
    for name, (tensors, meta, message) in cases.items():
        _write_raw(tmp_path / name, tensors, meta)
        with pytest.raises(DumpError, match=message):
            io.load_projection(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        io.load_projection(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DumpError, match="not a valid safetensors"):
        io.load_projection(tmp_path / "junk.safetensors")
    _write_raw(tmp_path / "bare.safetensors", {"projection.1_2": P, "projection.0_1": P})
    loaded = io.load_projection(tmp_path / "bare.safetensors")  # no metadata: from the keys
    assert loaded.mapping == [(0, 1), (1, 2)] and not loaded.shared


# --------------------------------------------------------------------------- fit on dumps


@pytest.mark.parametrize("kwargs", [{}, {"shared": False}, {"ridge": 0.3},
                                    {"method": "adam", "steps": 15, "seed": 0},
                                    {"method": "sgd", "steps": 15, "seed": 0, "batch_size": 7},
                                    {"method": "adam", "steps": 5, "seed": 0, "normalize": True}])
def test_fit_projection_on_dumps_equals_arrays(tmp_path, kwargs):
    import pkd

    rng = np.random.default_rng(37)
    mask = np.arange(8) < rng.integers(1, 9, size=(12, 1))
    student, teacher = _layers(rng, (12, 8), (6,) * 3), _layers(rng, (12, 8), (9,) * 4)
    for layer in student + teacher:
        layer[~mask] = np.nan  # padding may hold anything: the dumps' mask must be used
    save_dump(tmp_path / "s.safetensors", student, mask)
    save_dump(tmp_path / "t.npz", teacher, mask)
    mapping = [(0, 1), (2, 3), (1, 1)]
    with load_dump(tmp_path / "s.safetensors") as s, load_dump(tmp_path / "t.npz") as t:
        got = pkd.fit_projection(s, t, mapping, chunk_rows=5, **kwargs)
    want = pkd.fit_projection(student, teacher, mapping, attention_mask=mask, **kwargs)
    np.testing.assert_allclose(got.layer_losses, want.layer_losses, rtol=1e-10)
    for pair in mapping:
        np.testing.assert_allclose(got.projection_for(pair), want.projection_for(pair),
                                   rtol=1e-5, atol=1e-7)
    # Witness for the closed form: least squares on the unpadded rows.
    if not kwargs:
        S = np.concatenate([student[s][mask] for s, _ in mapping]).astype(np.float64)
        T = np.concatenate([teacher[t][mask] for _, t in mapping]).astype(np.float64)
        np.testing.assert_allclose(got.projection, np.linalg.lstsq(S, T, rcond=None)[0],
                                   rtol=1e-4, atol=1e-5)


def test_fit_projection_dump_errors(tmp_path):
    import pkd

    rng = np.random.default_rng(38)
    save_dump(tmp_path / "s.safetensors", _layers(rng, (6,)), metadata={"n_texts": "6"})
    save_dump(tmp_path / "t.safetensors", _layers(rng, (6,)), metadata={"n_texts": "7"})
    save_dump(tmp_path / "u.safetensors", _layers(rng, (6,)))
    with load_dump(tmp_path / "s.safetensors") as s, load_dump(tmp_path / "t.safetensors") as t, \
            load_dump(tmp_path / "u.safetensors") as u:
        with pytest.raises(DumpError, match="different texts"):
            pkd.fit_projection(s, t, [(0, 0)])
        with pytest.raises(TypeError, match=r"both be pkd\.io\.Dump"):
            pkd.fit_projection(s, list(u.layers), [(0, 0)])
        with pytest.raises(ValueError, match=r"layer 3 of student_hidden .*s.safetensors"):
            pkd.fit_projection(s, u, [(3, 0)])
