"""`pkd dump` and pkd.hf against the model run directly, on tiny BERTs built from configs.

Witnesses: the model's own forward pass on the same batches, with the pooling
recomputed in float64 NumPy; safetensors' own readers; hashlib. Bad input
must fail with a message naming the argument, and leave no file behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
from _hf_models import TEXTS, save_tiny_bert  # noqa: E402

import pkd.io  # noqa: E402
from pkd import hf  # noqa: E402
from pkd.cli import main  # noqa: E402

BATCH = 5


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def direct(model_dir: Path, texts, *, batch_size=BATCH, padding_side="right", max_length=None):
    """The model run directly, batch by batch: per batch (hidden_states float64, mask bool)."""
    model, tokenizer = hf.load_model(model_dir)
    tokenizer.padding_side = padding_side
    batches = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt",
                            truncation=max_length is not None, max_length=max_length)
            out = model(**enc, output_hidden_states=True)
            batches.append(([h.double().numpy() for h in out.hidden_states],
                            enc["attention_mask"].numpy().astype(bool)))
    return batches


def expected_rows(batches, layer: int, pool: str, seq_len: int, side: str = "right"):
    """The dump a witness builds: token states padded to seq_len, or pooled rows (float64)."""
    rows, masks = [], []
    for hidden, mask in batches:
        h = hidden[layer]
        b, t, d = h.shape
        if pool == "none":
            full = np.zeros((b, seq_len, d))
            full_mask = np.zeros((b, seq_len), dtype=bool)
            where = slice(0, t) if side == "right" else slice(seq_len - t, seq_len)
            full[:, where], full_mask[:, where] = h * mask[..., None], mask
            rows.append(full)
            masks.append(full_mask)
        elif pool == "cls":
            first = np.array([np.flatnonzero(m)[0] for m in mask])
            rows.append(h[np.arange(b), first])
        else:
            rows.append(np.stack([h[i][mask[i]].mean(axis=0) for i in range(b)]))
    return np.concatenate(rows), (np.concatenate(masks) if masks else None)


def no_leftovers(directory: Path, allowed=()) -> None:
    """Nothing but ``allowed`` files in ``directory`` (no partial dump, no temporary file)."""
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(allowed), names


# ---------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("pool", ["none", "cls", "mean"])
def test_dump_matches_the_model_for_every_pooling(hf_models, texts_file, tmp_path, pool):
    out = tmp_path / f"teacher_{pool}.safetensors"
    assert run_cli("dump", hf_models["teacher"], "--texts", texts_file, "--out", out,
                   "--batch-size", BATCH, "--pool", pool) == 0
    batches = direct(hf_models["teacher"], TEXTS)
    seq_len = max(mask.sum(1).max() for _, mask in batches)
    with pkd.io.load_dump(out) as dump:
        assert len(dump) == 5  # embeddings + 4 layers
        assert dump.lead_shape == ((len(TEXTS), seq_len) if pool == "none" else (len(TEXTS),))
        for layer in range(5):
            want, want_mask = expected_rows(batches, layer, pool, seq_len)
            got = np.asarray(dump[layer])
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        if pool == "none":
            np.testing.assert_array_equal(dump.attention_mask, want_mask)
            assert np.all(np.asarray(dump[2])[~want_mask] == 0)  # padding is zeros
        else:
            assert dump.attention_mask is None
        assert dump.metadata["pooling"] == pool
    # The file is plain safetensors: its own readers agree.
    from safetensors import safe_open
    from safetensors.numpy import load_file

    raw = load_file(out)
    with safe_open(str(out), framework="numpy") as f:
        assert f.metadata()["n_texts"] == str(len(TEXTS))
        np.testing.assert_array_equal(f.get_tensor("hidden_states.4"), raw["hidden_states.4"])
    assert sorted(raw) == (["attention_mask"] if pool == "none" else []) + [
        f"hidden_states.{i}" for i in range(5)]


def test_left_padding_cls_and_token_states(hf_models, tmp_path):
    model, tokenizer = hf.load_model(hf_models["student"])
    tokenizer.padding_side = "left"
    paths = {pool: tmp_path / f"{pool}.safetensors" for pool in ("none", "cls", "mean")}
    for pool, path in paths.items():
        hf.dump_hidden_states(model, tokenizer, TEXTS, path, batch_size=BATCH, pool=pool)
    batches = direct(hf_models["student"], TEXTS, padding_side="left")
    assert not batches[0][1][:, 0].all()  # some sequence does start with padding
    seq_len = max(mask.sum(1).max() for _, mask in batches)
    with pkd.io.load_dump(paths["none"]) as tokens, pkd.io.load_dump(paths["cls"]) as cls, \
            pkd.io.load_dump(paths["mean"]) as mean:
        assert tokens.metadata["padding_side"] == "left"
        for layer in range(3):
            want, want_mask = expected_rows(batches, layer, "none", seq_len, side="left")
            np.testing.assert_array_equal(tokens.attention_mask, want_mask)
            assert tokens.attention_mask[:, -1].all()  # padding on the left, all of it
            np.testing.assert_allclose(tokens[layer][:], want, rtol=1e-5, atol=1e-6)
            for pooled, name in ((cls, "cls"), (mean, "mean")):
                np.testing.assert_allclose(
                    pooled[layer][:], expected_rows(batches, layer, name, seq_len)[0],
                    rtol=1e-5, atol=1e-6)
        # [CLS] is the first real token: the cls rows are the token states at that position.
        first = tokens.attention_mask.argmax(axis=1)
        np.testing.assert_array_equal(cls[1][:], tokens[1][:][np.arange(len(TEXTS)), first])


def test_float16_and_layer_subset(hf_models, texts_file, tmp_path):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    assert run_cli("dump", hf_models["teacher"], "--texts", texts_file, "--out", full) == 0
    assert run_cli("dump", hf_models["teacher"], "--texts", texts_file, "--out", half,
                   "--dtype", "float16", "--layers", "2,4") == 0
    from safetensors import safe_open

    with safe_open(str(half), framework="numpy") as f:
        assert sorted(f.keys()) == ["attention_mask", "hidden_states.0", "hidden_states.1"]
        assert f.get_slice("hidden_states.0").get_dtype() == "F16"
    with pkd.io.load_dump(full) as a, pkd.io.load_dump(half) as b:
        assert len(b) == 2 and b[0].dtype == np.float32
        for k, layer in enumerate((2, 4)):
            np.testing.assert_array_equal(b[k][:], a[layer][:].astype(np.float16))
        np.testing.assert_array_equal(a.attention_mask, b.attention_mask)
        assert a.embeddings_index == 0 and a.has_embeddings is True
        assert b.embeddings_index is None and b.has_embeddings is False
        assert json.loads(b.metadata["layers"]) == [2, 4]
        assert b.metadata["dtype"] == "float16"


def test_embeddings_index_follows_the_layer_subset(hf_models, tmp_path):
    model, tokenizer = hf.load_model(hf_models["student"])
    path = tmp_path / "sub.safetensors"
    hf.dump_hidden_states(model, tokenizer, TEXTS[:3], path, layers=[2, 0], pool="mean")
    with pkd.io.load_dump(path) as dump:
        assert dump.embeddings_index == 1
        emb = direct(hf_models["student"], TEXTS[:3], batch_size=32)
        np.testing.assert_allclose(dump[1][:], expected_rows(emb, 0, "mean", 0)[0], rtol=1e-5)


def test_metadata(hf_models, texts_file, tmp_path):
    out = tmp_path / "t.safetensors"
    assert run_cli("dump", hf_models["teacher"], "--texts", texts_file, "--out", out,
                   "--max-length", "8", "--pool", "mean") == 0
    with pkd.io.load_dump(out) as dump:
        meta = dump.metadata
    encoded = json.dumps(TEXTS, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert meta["texts_sha256"] == hashlib.sha256(encoded).hexdigest() == dump.texts_sha256
    assert meta["texts_file_sha256"] == hashlib.sha256(texts_file.read_bytes()).hexdigest()
    assert meta["texts_file"] == "texts.txt" and dump.n_texts == len(TEXTS)
    assert meta["model"] == "teacher" and meta["model_class"] == "BertModel"
    assert meta["num_hidden_layers"] == "4" and meta["n_layers"] == "5"
    assert json.loads(meta["widths"]) == [64] * 5
    assert meta["embeddings_index"] == "0" and meta["max_length"] == "8"
    assert meta["pooling"] == "mean" and meta["pkd_version"] == pkd.__version__


def test_max_length_truncates(hf_models, tmp_path):
    model, tokenizer = hf.load_model(hf_models["teacher"])
    path = tmp_path / "t.safetensors"
    hf.dump_hidden_states(model, tokenizer, TEXTS, path, max_length=6, batch_size=BATCH)
    batches = direct(hf_models["teacher"], TEXTS, max_length=6)
    with pkd.io.load_dump(path) as dump:
        assert dump.lead_shape == (len(TEXTS), 6)
        np.testing.assert_allclose(dump[3][:], expected_rows(batches, 3, "none", 6)[0],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", hf.POOLS)
def test_each_text_is_tokenised_once(hf_models, tmp_path, monkeypatch, pool):
    model, tokenizer = hf.load_model(hf_models["student"])
    call, seen = type(tokenizer).__call__, []

    def counting(self, text, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else text)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    hf.dump_hidden_states(model, tokenizer, TEXTS, tmp_path / "d.safetensors",
                          batch_size=BATCH, pool=pool)
    assert sorted(seen) == sorted(TEXTS)


def _retokenizer(tokenizer, variant: str):
    """The tokenizer changed as ``variant`` says: how other models' tokenizers differ."""
    if variant == "no token_type_ids":  # e.g. RoBERTa's, GPT-2's
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    elif variant == "pad token 4, type 1":  # padding that is not id 0
        tokenizer.pad_token = "[MASK]"
        tokenizer._pad_token_type_id = 1  # no public setter; what the tokenizer pads with
        assert (tokenizer.pad_token_id, tokenizer.pad_token_type_id) == (4, 1)
    elif variant == "no attention_mask":
        tokenizer.model_input_names = ["input_ids", "token_type_ids"]
    return tokenizer


@pytest.mark.parametrize("variant", ["", "no token_type_ids", "pad token 4, type 1",
                                     "no attention_mask"])
@pytest.mark.parametrize(("side", "max_length"), [("right", None), ("left", None), ("right", 6),
                                                  ("left", 6)])
def test_numpy_padding_is_the_tokenizers(hf_models, side, max_length, variant):
    """_padded_batch against tokenizer(batch, padding=True, truncation, max_length) itself."""
    _, tokenizer = hf.load_model(hf_models["teacher"])
    tokenizer = _retokenizer(tokenizer, variant)
    tokenizer.padding_side = side
    tokens = hf._tokenise(tokenizer, TEXTS, max_length, chunk_size=7)  # chunks meet mid-batch
    for start in range(0, len(TEXTS), BATCH):
        stop = min(start + BATCH, len(TEXTS))
        kwargs = {"truncation": max_length is not None, "max_length": max_length}
        want = tokenizer(TEXTS[start:stop], padding=True, return_tensors="pt", **kwargs)
        got, real = hf._padded_batch(tokenizer, tokens, start, stop)
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        mask = tokenizer(TEXTS[start:stop], padding=True, return_attention_mask=True,
                         return_tensors="np", **kwargs)["attention_mask"]
        np.testing.assert_array_equal(real, mask.astype(bool))
        assert (real[:, 0] if side == "right" else real[:, -1]).all()


def test_numpy_padding_of_special_tokens_mask_and_an_output_it_cannot_pad(hf_models):
    _, tokenizer = hf.load_model(hf_models["teacher"])
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS, return_special_tokens_mask=True, return_attention_mask=False)
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in enc["input_ids"]])])
    tokens = hf._Tokens({key: np.concatenate(values).astype(np.int32)
                         for key, values in enc.items()}, offsets)
    want = tokenizer(TEXTS[:BATCH], padding=True, return_special_tokens_mask=True,
                     return_tensors="pt")
    got, _ = hf._padded_batch(tokenizer, tokens, 0, BATCH)
    assert sorted(got) == sorted(want) and "special_tokens_mask" in got
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    tokens.ids["word_ids"] = tokens.ids["input_ids"]
    with pytest.raises(ValueError, match="returns 'word_ids', which it does not pad"):
        hf._padded_batch(tokenizer, tokens, 0, BATCH)


def test_a_token_level_dump_needs_a_padding_token(hf_models, tmp_path):
    model, tokenizer = hf.load_model(hf_models["student"])
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="BertTokenizer has no padding token.*pad_token"):
        hf.dump_hidden_states(model, tokenizer, TEXTS, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("side", "max_length", "variant"),
                         [("right", None, ""), ("left", None, ""), ("left", 6, ""),
                          ("right", None, "no token_type_ids"),
                          ("left", None, "pad token 4, type 1")])
def test_token_level_batches_are_the_tokenizers_own(hf_models, tmp_path, monkeypatch, side,
                                                    max_length, variant):
    """Padded from the stored token ids: the model gets tokenizer(batch, padding=True), exactly."""
    model, tokenizer = hf.load_model(hf_models["teacher"])
    tokenizer = _retokenizer(tokenizer, variant)
    tokenizer.padding_side = side
    want = [tokenizer(TEXTS[start:start + BATCH], padding=True, return_tensors="pt",
                      truncation=max_length is not None, max_length=max_length)
            for start in range(0, len(TEXTS), BATCH)]
    with torch.inference_mode():
        states = [model(**enc, output_hidden_states=True).hidden_states for enc in want]
    forward, got = model.forward, []

    def recording(**kwargs):
        got.append({k: v for k, v in kwargs.items() if k != "output_hidden_states"})
        return forward(**kwargs)

    monkeypatch.setattr(model, "forward", recording)
    path = tmp_path / "t.safetensors"
    hf.dump_hidden_states(model, tokenizer, TEXTS, path, batch_size=BATCH, max_length=max_length)
    assert len(got) == len(want)
    for inputs, enc in zip(got, want, strict=True):
        assert sorted(inputs) == sorted(enc)
        for key, value in enc.items():
            assert inputs[key].dtype == value.dtype and torch.equal(inputs[key], value), key
    seq_len = max(enc["input_ids"].shape[1] for enc in want)
    batches = [([h.numpy() for h in hidden], enc["attention_mask"].numpy().astype(bool))
               for hidden, enc in zip(states, want, strict=True)]
    with pkd.io.load_dump(path) as dump:
        for layer in range(5):  # bit-identical to the model run on the tokenizer's batches
            expected, mask = expected_rows(batches, layer, "none", seq_len, side=side)
            np.testing.assert_array_equal(dump[layer][:], expected.astype(np.float32))
        np.testing.assert_array_equal(dump.attention_mask, mask)


def test_same_texts_from_every_format_and_check_same_texts(hf_models, texts_file, tmp_path):
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                             for i, t in enumerate(TEXTS)))
    tsv = tmp_path / "texts.tsv"
    tsv.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(TEXTS)))
    csv_file = tmp_path / "texts.csv"
    csv_file.write_text("text,id\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(TEXTS)))
    assert hf.read_texts(jsonl, field="text") == TEXTS
    assert hf.read_texts(tsv, column="text") == TEXTS
    assert hf.read_texts(csv_file, column="text") == TEXTS
    student, teacher = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    assert run_cli("dump", hf_models["student"], "--texts", jsonl, "--field", "text",
                   "--out", student) == 0
    assert run_cli("dump", hf_models["teacher"], "--texts", tsv, "--column", "text",
                   "--out", teacher) == 0
    other = tmp_path / "other.safetensors"
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join(TEXTS[1:] + TEXTS[:1]) + "\n")  # same lengths, other order
    assert run_cli("dump", hf_models["teacher"], "--texts", swapped, "--out", other) == 0
    with pkd.io.load_dump(student) as s, pkd.io.load_dump(teacher) as t, \
            pkd.io.load_dump(other) as o:
        assert pkd.io.check_same_texts(s, t) is True
        with pytest.raises(pkd.io.DumpError, match="different texts.*swapped.txt"):
            pkd.io.check_same_texts(s, o)


# ---------------------------------------------------------------------------- bad input


def bad_input_cases(tmp_path: Path, hf_models) -> dict:
    """{name: (cli args, message pattern)} for inputs `pkd dump` must refuse."""
    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    good = write("good.txt", b"the cat\n")
    long_text = write("long.txt", b"the cat\n" + b"the " * 80 + b"\n")
    return {
        "missing texts": (["--texts", tmp_path / "nope.txt"], r"--texts .*nope.txt: no such"),
        "empty texts": (["--texts", write("empty.txt", b"\n  \n")], r"empty"),
        "blank line": (["--texts", write("blank.txt", b"a cat\n\nthe dog\n")],
                       r"line 2 is blank"),
        "undecodable": (["--texts", write("latin.txt", b"the caf\xe9\n")],
                        r"not UTF-8.*byte 7 \(line 1\)"),
        "jsonl without --field": (["--texts", write("a.jsonl", b'{"text": "a cat"}\n')],
                                  r"--field"),
        "jsonl missing field": (["--texts", write("b.jsonl", b'{"text": "a"}\n{"body": "b"}\n'),
                                 "--field", "text"], r"--field 'text' is missing from line 2"),
        "csv without --column": (["--texts", write("a.csv", b"text\na cat\n")], r"--column"),
        "csv missing column": (["--texts", write("b.csv", b"body\na cat\n"), "--column", "text"],
                               r"--column 'text' is not in the header.*'body'"),
        "unknown extension": (["--texts", write("t.md", b"a cat\n")], r"unknown extension"),
        "max-length 0": (["--texts", good, "--max-length", "0"], r"--max-length must be a pos"),
        "max-length negative": (["--texts", good, "--max-length", "-3"], r"--max-length"),
        "batch-size 0": (["--texts", good, "--batch-size", "0"], r"--batch-size"),
        "bad layers": (["--texts", good, "--layers", "0,7"], r"--layers.*0\.\.4"),
        "text too long": (["--texts", long_text], r"text 1 \(0-based\) has 82 tokens, more "
                                                  r"than the model takes \(64\).*--max-length 64"),
        "text too long, pooled": (["--texts", long_text, "--pool", "mean"],
                                  r"text 1 \(0-based\) has 82 tokens.*--max-length 64"),
        "out not safetensors": (["--texts", good, "--out", tmp_path / "out" / "x.npz"],
                                r"\.safetensors"),
    }


def test_bad_input_is_refused_and_nothing_written(hf_models, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, (args, pattern) in bad_input_cases(tmp_path, hf_models).items():
        if "--out" not in args:
            args = [*args, "--out", out_dir / "dump.safetensors"]
        code = run_cli("dump", hf_models["teacher"], *args)
        err = capsys.readouterr().err
        assert code == 2, name
        assert "pkd dump: error:" in err, (name, err)
        assert re.search(pattern, err, re.S), (name, err)
        no_leftovers(out_dir)


def test_model_directory_without_tokenizer_or_weights(tmp_path, texts_file, capsys):
    no_tok = save_tiny_bert(tmp_path / "no_tok", layers=2, width=32, seed=0, tokenizer=False)
    no_weights = save_tiny_bert(tmp_path / "no_w", layers=2, width=32, seed=0, weights=False)
    out = tmp_path / "out.safetensors"
    cases = {no_tok: r"no tokenizer files.*tokenizer.save_pretrained",
             no_weights: r"cannot load the model's weights",
             tmp_path / "absent": r"no such directory"}
    for directory, pattern in cases.items():
        assert run_cli("dump", directory, "--texts", texts_file, "--out", out) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err, re.S), err
        assert not out.exists()


def test_an_error_mid_dump_leaves_no_file(hf_models, tmp_path):
    model, tokenizer = hf.load_model(hf_models["student"])
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"previous content")
    calls = {"n": 0}
    forward = model.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    model.forward = failing
    with pytest.raises(KeyboardInterrupt):
        hf.dump_hidden_states(model, tokenizer, TEXTS, path, batch_size=BATCH)
    assert path.read_bytes() == b"previous content"
    no_leftovers(tmp_path, ["s.safetensors"])
    assert not model.training
    import threading

    assert not [t for t in threading.enumerate()  # the writing and flushing threads
                if t.name in ("pkd-write", "pkd-sync")]


def test_dump_hidden_states_argument_errors(hf_models, tmp_path):
    model, tokenizer = hf.load_model(hf_models["student"])
    path = tmp_path / "x.safetensors"
    cases = [({"texts": []}, "non-empty list"), ({"texts": ["a", 3]}, r"texts\[1\] is int"),
             ({"pool": "max"}, "pool"), ({"dtype": "bfloat16"}, "dtype"),
             ({"layers": [1, 1]}, "distinct"), ({"max_length": 0}, "max_length"),
             ({"batch_size": -1}, "batch_size"), ({"metadata": {"pooling": "x"}}, "recorded")]
    for kwargs, pattern in cases:
        texts = kwargs.pop("texts", TEXTS)
        with pytest.raises((ValueError, TypeError), match=pattern):
            hf.dump_hidden_states(model, tokenizer, texts, path, **kwargs)
        assert not path.exists()


def test_progress_bar_only_on_a_terminal(hf_models, texts_file, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pkd.cli", "dump", str(hf_models["student"]), "--texts",
         str(texts_file), "--out", str(tmp_path / "s.safetensors")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "it/s" not in done.stderr and "%|" not in done.stderr  # no bar in a log
    assert "padded to" in done.stderr  # the assumption is said
    assert "wrote" in done.stdout


# ---------------------------------------------------------------------------- the whole path


def test_fit_then_train_example(tmp_path):
    """dump → analyze → fit --mapping optimal → load_projection → 20 steps: the loss falls."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / "fit_then_train.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for name in ("analysis/summary.json", "fit/projection.safetensors", "student.safetensors"):
        assert (tmp_path / name).is_file(), name
    loaded = pkd.io.load_projection(tmp_path / "fit" / "projection.safetensors")
    assert f"fit of a shared projection (32→64) on {loaded.mapping}" in out
    # Witness: the fitted projection's loss on the dumped rows, in float64 NumPy.
    printed = float(re.search(r"on the dumped texts: L_hidden = ([\d.]+)", out).group(1))
    with pkd.io.load_dump(tmp_path / "student.safetensors") as s, \
            pkd.io.load_dump(tmp_path / "teacher.safetensors") as t:
        mask = s.attention_mask
        P = loaded.projection.astype(np.float64)
        losses = [np.mean((s[i][:][mask].astype(np.float64) @ P - t[j][:][mask]) ** 2)
                  for i, j in loaded.mapping]
    np.testing.assert_allclose(printed, np.mean(losses), rtol=1e-5)
    runs = {name: (float(a), float(b)) for name, a, b in
            re.findall(r"(\w+) init: held-out L_hidden ([\d.]+) -> ([\d.]+)", out)}
    assert runs["fitted"][1] < runs["fitted"][0]  # training lowers the hidden loss
    assert runs["fitted"][0] < runs["xavier"][0]  # and the fitted start beats Xavier's
