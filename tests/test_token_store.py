"""Tests of data at scale: parallel validation and tokenisation (data.num_proc, trainables/data.py) and the
token store a sweep writes once and every trial memory-maps (trainables/token_store.py).

Run with `python -m pytest tests/test_token_store.py -q` (about 15 s, no Ray: every sweep test of
tests/test_sweep.py runs its trials on a store, and a StoredPairs pickles as its path, tested here).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers_tokenizer import build_bpe_tokenizer
from tests.tiny_world import build_model_dir, engine_args, pair_rows, write_jsonl
from trainables.data import InvalidDataError, RowCheck, load_preference_pairs
from trainables.entrypoints import load_preference_data, tokenizer_for
from trainables.reference_cache import ReferenceKeyInputs, reference_fingerprint
from trainables.row_processes import DataWorkerError, resolve_num_proc
from trainables.token_store import StoredPairs, check_token_store, input_key, open_token_store, write_token_store
from trainables.tokenization import load_tokenized_pairs

WORDS = "the cat sat on mat and dog ran rug good bad yes no maybe hello world".split()


def random_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 30))),
             "chosen": "good " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
             "rejected": "bad " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))} for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer()


def test_parallel_tokenisation_gives_the_serial_pairs_in_order(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "pairs.jsonl", random_rows(4000))
    logs = []
    for num_proc in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainables.tokenization"):
            pairs = load_tokenized_pairs(str(path), tokenizer=tokenizer, max_length=24, num_proc=num_proc)
        logs.append([record.getMessage() for record in caplog.records if "truncated" in record.getMessage()])
        if num_proc == 1:
            serial = pairs
    assert len(serial) == 4000 and pairs == serial  # same token ids, same order (truncation included)
    assert len(logs[0]) == 1 and logs[1] == logs[0]  # one line counting all 4000 pairs, not one per process
    assert "prompts cut in" in logs[0][0] and "of 4000 pairs" in logs[0][0]
    assert resolve_num_proc(None, 19_999) == 1  # auto: small sets stay in one process
    assert resolve_num_proc(3, 10) == 3 and resolve_num_proc(4, 2) == 1


def test_parallel_mode_names_the_bad_rows_as_the_serial_path_does(tmp_path, tokenizer):
    rows = random_rows(3000, seed=1)
    rows[5]["chosen"] = ""  # a field problem while reading (first chunk)
    rows[1700]["prompt"] = 7  # wrong type (a middle chunk)
    long = "yes " * 40
    rows[2990].update(chosen=long + "good", rejected=long + "bad")  # identical once cut to max_length (last chunk)
    lines = [json.dumps(row) for row in rows]
    lines[2500] = "{not json"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    errors = []
    for num_proc in (1, 2):
        with pytest.raises(InvalidDataError) as caught:
            load_tokenized_pairs(str(path), tokenizer=tokenizer, max_length=24, num_proc=num_proc)
        errors.append(caught.value)
    serial, parallel = errors
    assert str(parallel) == str(serial) and parallel.problems == serial.problems
    message = str(serial)
    assert str(path) in message and "4 of 3000 rows are invalid" in message
    for where in ("row 5 (line 6), field 'chosen'", "row 1700 (line 1701), field 'prompt'", "row 2500 (line 2501)",
                  "row 2990 (line 2991)"):
        assert where in message
    assert "raise data.max_length" in message  # the tokenisation check's advice survives the processes
    dropped = load_tokenized_pairs(str(path), tokenizer=tokenizer, max_length=24, num_proc=2, drop_invalid=True)
    assert dropped == load_tokenized_pairs(str(path), tokenizer=tokenizer, max_length=24, num_proc=1,
                                           drop_invalid=True) and len(dropped) == 2996


def test_a_data_process_that_dies_is_an_error_naming_num_proc_not_a_hang(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", random_rows(40, seed=5))

    def killed(rows, tally):  # what the kernel's out-of-memory killer does to a worker
        os._exit(137)

    with pytest.raises(DataWorkerError, match=r"pairs.jsonl: .*data.num_proc=2\) died.*set data.num_proc lower"):
        load_preference_pairs(str(path), after=RowCheck(killed), num_proc=2)


def test_a_store_gives_back_the_pairs_it_was_written_with(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", random_rows(600, seed=2))
    pairs = load_tokenized_pairs(str(path), tokenizer=tokenizer, max_length=24)
    store = write_token_store(tmp_path / "tokens-k", {"train": pairs[:500], "eval": pairs[500:]}, "k")
    assert check_token_store(store, verify_content=True)["splits"]["train"]["rows"] == 500
    splits = open_token_store(store)
    train = splits["train"]
    assert isinstance(train, StoredPairs) and len(train) == 500 and list(splits["eval"]) == pairs[500:]
    assert list(train) == pairs[:500] and [train[i] for i in range(500)] == pairs[:500]
    assert train[-1] == pairs[499] and train[10:13] == pairs[10:13]
    with pytest.raises(IndexError, match="pair 500 of 500"):
        train[500]
    shipped = pickle.dumps(train)  # what Ray ships to a trial: the path, reopened and mapped there
    assert len(shipped) < 300 and list(pickle.loads(shipped)) == pairs[:500]
    inputs = ReferenceKeyInputs("weights", "LlamaForCausalLM", "float32", "float32", "sdpa")
    assert reference_fingerprint(inputs, list(train)) == reference_fingerprint(inputs, pairs[:500])  # cache reuse


def test_a_truncated_or_partial_store_is_never_reused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", random_rows(300, seed=3))
    pairs = load_tokenized_pairs(str(path), tokenizer=tokenizer, max_length=24)
    store = write_token_store(tmp_path / "tokens-k", {"train": pairs, "eval": pairs[:5]}, "k")
    arrow = store / "train.arrow"
    whole = arrow.read_bytes()
    arrow.write_bytes(whole[: len(whole) // 2])  # a crash or a full disk mid-copy
    assert check_token_store(store) is None
    middle = len(whole) // 2  # inside the record batches' token values
    arrow.write_bytes(whole[:middle] + bytes([whole[middle] ^ 1]) + whole[middle + 1 :])  # same size, altered
    assert check_token_store(store) is not None and check_token_store(store, verify_content=True) is None
    write_token_store(store, {"train": pairs, "eval": pairs[:5]}, "k")  # the damaged store is replaced
    assert check_token_store(store, verify_content=True) is not None and list(open_token_store(store)["train"]) == pairs
    (store / "manifest.json").unlink()  # a store the writer never finished
    assert check_token_store(store) is None
    assert not list(tmp_path.glob(".tokens-k.partial-*"))  # no temporary folder left behind


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("token-store") / "model")


def test_the_store_key_follows_the_data_file_the_tokenizer_and_max_length(tmp_path, tiny_model):
    model = tiny_model
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows("explicit", 40, seed=1))
    spec = engine_args(str(model), str(train), data__max_length=48, data__eval_holdout=4)
    tokenizer = tokenizer_for(spec.model)
    key = input_key(spec.data, tokenizer, str(model))
    assert key == input_key(spec.data, tokenizer, str(model))
    assert input_key(replace(spec.data, num_proc=2), tokenizer, str(model)) == key  # same pairs for any num_proc
    assert input_key(replace(spec.data, max_length=40), tokenizer, str(model)) != key
    other_tokenizer = build_bpe_tokenizer()
    assert input_key(spec.data, other_tokenizer, str(model)) != key
    write_jsonl(train, pair_rows("explicit", 40, seed=2))
    assert input_key(spec.data, tokenizer, str(model)) != key
    assert input_key(replace(spec.data, train="some/hub-dataset"), tokenizer, str(model)) is None


def test_a_sweep_writes_the_store_once_and_reads_it_back_on_resume(tmp_path, monkeypatch, tiny_model):
    model = tiny_model
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows("explicit", 40, seed=1))
    spec = engine_args(str(model), str(train), data__max_length=48, data__eval_holdout=4)
    stores = tmp_path / "sweep" / "data"
    bad = write_jsonl(tmp_path / "bad.jsonl", pair_rows("explicit", 40, seed=1)[:39] + [{"prompt": "p", "chosen": ""}])
    with pytest.raises(InvalidDataError, match=r"bad.jsonl: 1 of 40 rows are invalid\n  row 39 \(line 40\)"):
        load_preference_data(spec.model, replace(spec.data, train=str(bad)), token_stores=str(stores))
    assert not stores.exists()  # bad data fails before anything is written
    first = load_preference_data(spec.model, spec.data, token_stores=str(stores))
    assert isinstance(first.train, list) and not stores.exists()  # validated and tokenised; nothing written yet
    stored = first.stored()
    assert stored.store.parent == stores and isinstance(stored.train, StoredPairs)
    assert list(stored.train) == first.train and list(stored.eval) == first.eval

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a complete store is read, not rebuilt")

    monkeypatch.setattr("trainables.entrypoints.load_tokenized_pairs", no_tokenising)
    again = load_preference_data(spec.model, spec.data, token_stores=str(stores))
    assert isinstance(again.train, StoredPairs) and again.store == stored.store and list(again.train) == first.train
    assert again.stored() is again
    (stored.store / "eval.arrow").write_bytes(b"")  # damaged: not reused, so the data is tokenised again
    with pytest.raises(AssertionError, match="not rebuilt"):
        load_preference_data(spec.model, spec.data, token_stores=str(stores))
