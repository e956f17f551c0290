"""The ``dump`` workload of ``pkd bench``: it runs on tiny sizes and reports every figure."""

import io
import json
import math

import pytest

from pkd import bench


def test_dump_workload_reports_finite_shares_and_both_memory_peaks(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setattr(bench, "_COOL_DOWN_S", 0.0)
    monkeypatch.setattr(bench, "_MIN_ROUND_S", 0.0)  # exactly the runs asked for
    out = io.StringIO()
    result = bench.bench_dump(n_texts=40, memory_texts=(8, 24), batch_size=8, repeats=5,
                              out=out)
    for key in ("dump_s", "forward_s", "tokenise_s", "tokenise_once_s", "pkd_share_of_forward",
                "tokenise_once_extra_share", "writing_share",
                "tokenise_share_of_forward", "pkd_ms_per_batch", "peak_ratio"):
        assert math.isfinite(result[key]), key
    assert result["dump_s"] > 0 and result["forward_s"] > 0 and result["tokenise_s"] > 0
    assert result["memory_texts"] == [8, 24] and len(result["peak_rss_mib"]) == 2
    assert all(peak > 10 for peak in result["peak_rss_mib"])  # a process with torch loaded
    assert result["peak_ratio"] == result["peak_rss_mib"][1] / result["peak_rss_mib"][0]
    printed = out.getvalue().strip().splitlines()
    assert printed[0].startswith("dump, tiny BERT") and "% of the forward" in printed[0]
    assert printed[1].startswith("dump peak memory") and "24 texts" in printed[1]
    json.dumps(result)  # --json stores it as it is


def test_dump_texts_are_reproducible_and_of_3_to_29_words():
    texts = bench.synthetic_texts(500)
    assert texts == bench.synthetic_texts(500)
    counts = [len(t.split()) for t in texts]
    assert min(counts) >= 3 and max(counts) <= 29
    assert set(" ".join(texts).split()) <= set(bench._DUMP_WORDS)


def test_dump_workload_says_it_was_skipped_without_transformers(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    out = io.StringIO()
    result = bench.bench_dump(out=out)
    assert "skipped" in result
    assert out.getvalue().strip().startswith("dump: skipped, it needs transformers and torch")


def test_dump_is_a_bench_variant():
    assert "dump" in bench.VARIANTS
    assert bench.check_variants(["dump"]) == ("dump",)


def test_dump_workload_says_it_was_skipped_without_torch(monkeypatch):
    monkeypatch.setattr(bench, "_torch", lambda: None)
    out = io.StringIO()
    assert "skipped" in bench.bench_dump(out=out)
    assert "pip install 'pkd[hf]'" in out.getvalue()
