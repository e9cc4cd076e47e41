"""Adversarial corpus, configs, `--set`, command-line flags and secrets: every hostile or mistaken config is
refused before any work (exit 2, one short message naming the file, line, key or flag, nothing written),
and no planted secret (in a URI, an environment variable or a secret-named key) is printed, logged or
written, error paths included.

Each case is a RULE applied to a valid config of the tiny world (tests/tiny_world.py): a YAML or JSON text
that breaks the parser's limits (duplicate keys, alias bombs, nesting, encodings, file kinds), a `--set`
that is malformed or absurd (bounds, booleans for numbers, non-finite numbers, sweep ranges, study
overrides, unknown keys deep inside sections), a bad flag, or a planted secret on an error path of
`dpo check`, `dpo train`, `dpo analyze` and `dpo export`. The harness is tests/adversarial.py.
Run: `python -m pytest tests/test_adversarial_config.py -q` (well under a minute on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

from tests.adversarial import SECRET, refused, run_cli
from tests.tiny_world import build_model_dir, pair_rows, write_jsonl

COMMANDS = ["check", "train"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A Llama-shaped model folder and explicit train/eval pair files, built once."""
    root = tmp_path_factory.mktemp("adversarial-config")
    return {"root": root, "model": build_model_dir(root / "model", "llama"),
            "train": write_jsonl(root / "train.jsonl", pair_rows("explicit", 8, seed=1)),
            "eval": write_jsonl(root / "eval.jsonl", pair_rows("explicit", 4, seed=2))}


def valid_yaml(world: dict, run: Path) -> str:
    """A config that passes `dpo check` and trains in seconds; cases break it by one rule."""
    return (f"name: adversarial\noutput_dir: {run / 'out'}\nmodel:\n  path: {world['model']}\n"
            f"data:\n  train: {world['train']}\n  eval: {world['eval']}\n  max_length: 32\n"
            "dpo:\n  beta: 0.1\n"
            f"train:\n  max_steps: 1\n  batch_size: 4\n  eval_every: 1\n  eval_batch_size: 4\n  device: cpu\n"
            f"reference:\n  cache_dir: {run / 'cache'}\n")


def guarded(world: dict, run: Path) -> dict:
    """What every refused case must leave alone (inputs) and must not create (outputs)."""
    return {"untouched": [world["model"], world["train"], world["eval"]],
            "must_not_exist": [run / "out", run / "cache"], "written_roots": [run]}


# ---- config files that break the parser's rules --------------------------------------------------

def text_file(make_text: Callable[[str], str], name: str = "config.yaml") -> Callable[[dict, Path], Path]:
    def build(world: dict, run: Path) -> Path:
        path = run / name
        path.write_text(make_text(valid_yaml(world, run)))
        return path
    return build


def bytes_file(make_bytes: Callable[[str], bytes], name: str = "config.yaml") -> Callable[[dict, Path], Path]:
    def build(world: dict, run: Path) -> Path:
        path = run / name
        path.write_bytes(make_bytes(valid_yaml(world, run)))
        return path
    return build


def directory(world: dict, run: Path) -> Path:
    (run / "configs.yaml").mkdir()
    (run / "configs.yaml" / "config.yaml").write_text(valid_yaml(world, run))
    return run / "configs.yaml"


def fifo(world: dict, run: Path) -> Path:
    os.mkfifo(run / "config.yaml")  # reading it would block forever
    return run / "config.yaml"


def nested_json(world: dict, run: Path) -> Path:
    deep = '{"a": ' * 3000 + "{}" + "}" * 3000
    path = run / "config.json"
    path.write_text(f'{{"name": "adversarial", "model": {{"path": "{world["model"]}"}}, '
                    f'"data": {{"train": "{world["train"]}", "columns": {deep}}}}}')
    return path


ALIAS_BOMB = "\n".join(
    [f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 10)])
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + ALIAS_BOMB.split("\n", 1)[1] + "\n"

FILE_CASES: dict[str, tuple[Callable[[dict, Path], Path], tuple[str, ...]]] = {
    # id: (build the config file, what the message must name besides the file)
    "duplicate-top-level-key": (text_file(lambda t: t + "name: again\n"), ("name", "line", "twice")),
    "duplicate-section": (text_file(lambda t: t + "train:\n  max_steps: 5\n"), ("train", "line", "twice")),
    "duplicate-nested-key": (text_file(lambda t: t.replace("  max_steps: 1\n", "  max_steps: 1\n  max_steps: 9\n")),
                             ("max_steps", "line")),
    "duplicate-key-in-flow-mapping": (text_file(lambda t: t.replace("dpo:\n  beta: 0.1\n", "dpo: {beta: 0.1, beta: 0.3}\n")),
                                      ("beta", "twice")),
    "duplicate-key-deep-in-free-mapping": (text_file(lambda t: t + "study:\n  sft:\n    learning_rate: 0.1\n"
                                                     "    learning_rate: 0.2\n"), ("learning_rate", "twice")),
    "alias-bomb": (text_file(lambda t: t.replace("dpo:\n  beta: 0.1\n", "") + ALIAS_BOMB + "dpo:\n  beta: *i\n"),
                   ("alias",)),  # under a key whose bad value an error would print
    "recursive-alias": (text_file(lambda t: t + "loop: &loop [*loop]\n"), ("alias",)),
    "deeply-nested-yaml": (text_file(lambda t: t + "deep: " + "[" * 5000 + "]" * 5000 + "\n"), ("nested",)),
    "deeply-nested-json": (nested_json, ("nested",)),
    "directory-as-config": (directory, ("directory",)),
    "fifo-as-config": (fifo, ("regular file",)),
    "latin-1-bytes": (bytes_file(lambda t: t.replace("name: adversarial", "name: caf\xe9").encode("latin-1")),
                      ("UTF-8", "line 1")),
    "utf-16-file": (bytes_file(lambda t: t.encode("utf-16")), ("UTF-8",)),
    "binary-junk": (bytes_file(lambda t: bytes(range(256)) * 8), ("UTF-8",)),
    "empty-file": (text_file(lambda t: ""), ("empty",)),
    "only-comments": (text_file(lambda t: "# nothing here\n# at all\n"), ("empty",)),
    "top-level-list": (text_file(lambda t: "- name: adversarial\n- model: x\n"), ("mapping",)),
    "top-level-scalar": (text_file(lambda t: "just some words\n"), ("mapping",)),
    "unclosed-bracket": (text_file(lambda t: t + "sweep:\n  beta: [0.1, 0.2\n"), ("YAML", "line")),
    "tab-indentation": (text_file(lambda t: t + "resources:\n\tnum_workers: 2\n"), ("YAML", "line")),
    "integer-of-5000-digits": (text_file(lambda t: t.replace("batch_size: 4", "batch_size: " + "9" * 5000)), ("number",)),
    "nul-character-in-a-value": (text_file(lambda t: t.replace("device: cpu", 'device: "cp\\0u"')), ("train.device", "NUL")),
    "lone-surrogate-in-a-value": (text_file(lambda t: t + 'tracking:\n  experiment: "x\\ud800y"\n'),
                                  ("tracking.experiment", "Unicode")),
    "infinite-number-in-a-free-mapping": (text_file(lambda t: t + "study:\n  sft: {learning_rate: .inf}\n"),
                                          ("study.sft.learning_rate", "finite")),
    "config-of-5-megabytes": (text_file(lambda t: t + "# " + "x" * 5_000_000 + "\n"), ("KB",)),
    "config-of-200k-aliases-under-the-size-limit": (text_file(lambda t: t + "a: &a [1]\nb: [" + "*a," * 50_000 + "]\n"),
                                                    ("values",)),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", FILE_CASES, ids=list(FILE_CASES))
def test_config_file_breaking_a_parser_rule_is_refused(world, tmp_path, case, command):
    build, names = FILE_CASES[case]
    config = build(world, tmp_path)
    started = time.monotonic()
    refused([command, str(config)], names=(str(config), *names), **guarded(world, tmp_path))
    assert time.monotonic() - started < 30, "a hostile config must be refused in bounded time (the unbounded parser ran 84 s into MemoryError)"


def test_alias_bomb_is_refused_in_well_under_a_second(world, tmp_path):
    config = FILE_CASES["alias-bomb"][0](world, tmp_path)
    assert len(ALIAS_BOMB) < 1024
    started = time.monotonic()
    refused(["check", str(config)], names=(str(config), "alias"))
    assert time.monotonic() - started < 1.0


def test_unreadable_config_is_refused(world, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    config = text_file(lambda t: t)(world, tmp_path)
    config.chmod(0)
    refused(["check", str(config)], names=(str(config), "permission"))


@pytest.mark.parametrize("path, names", [("with\0nul.yaml", ("cannot be read",)),
                                         ("x" * 5000 + ".yaml", ("cannot be read",))],
                         ids=["nul-in-config-path", "config-path-too-long"])
def test_config_path_the_filesystem_cannot_take_is_refused(world, tmp_path, path, names):
    outcome = refused(["check", str(tmp_path / path)], names=names)
    assert "x" * 500 not in outcome.stderr  # the path is shown as an excerpt


# ---- --set values: absurd, mistyped, malformed ---------------------------------------------------

SET_CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    # id: (--set arguments on the valid config, what the message must name)
    "batch-size-1e23": (["train.batch_size=100000000000000000000000"], ("train.batch_size",)),
    "batch-size-float-1e23": (["train.batch_size=1.0e+23"], ("train.batch_size",)),
    "eval-batch-size-huge": (["train.eval_batch_size=1000000000"], ("train.eval_batch_size",)),
    "max-steps-1e12": (["train.max_steps=1000000000000"], ("train.max_steps",)),
    "max-length-beyond-any-model": (["data.max_length=1000000000"], ("data.max_length",)),
    "workers-1e9": (["resources.num_workers=1000000000"], ("resources.num_workers",)),
    "seed-beyond-64-bits": (["train.seed=100000000000000000000000000"], ("train.seed",)),
    "negative-seed": (["train.seed=-1"], ("train.seed",)),
    "infinite-cpus": (["resources.cpus_per_worker=.inf"], ("resources.cpus_per_worker", "finite")),
    "nan-gpus": (["resources.gpus_per_worker=.nan"], ("resources.gpus_per_worker",)),
    "nan-learning-rate": (["train.learning_rate=.nan"], ("train.learning_rate",)),
    "infinite-beta": (["dpo.beta=.inf"], ("dpo.beta",)),
    "true-as-max-steps": (["train.max_steps=true"], ("train.max_steps", "not true")),
    "true-as-learning-rate": (["train.learning_rate=true"], ("train.learning_rate",)),
    "false-as-kl-weight": (["dpo.kl_weight=false"], ("dpo.kl_weight",)),
    "one-as-use-gpu": (["resources.use_gpu=1"], ("resources.use_gpu", "true or false")),
    "text-as-trust-remote-code": (["model.trust_remote_code='yes'"], ("model.trust_remote_code",)),
    "padding-buckets-absurd": (["train.padding_buckets=1000000000"], ("train.padding_buckets",)),
    "sweep-range-min-above-max": (["sweep.strategy=random", "sweep.beta={min: 1.0, max: 0.1}"], ("sweep.beta", "min < max")),
    "sweep-range-min-equals-max": (["sweep.strategy=optuna", "sweep.learning_rate={min: 0.1, max: 0.1}"],
                                   ("sweep.learning_rate",)),
    "sweep-empty-list": (["sweep.strategy=grid", "sweep.beta=[]"], ("sweep.beta", "empty")),
    "sweep-true-in-list": (["sweep.strategy=grid", "sweep.kl_weight=[0.0, true]"], ("sweep.kl_weight",)),
    "sweep-true-as-range-end": (["sweep.strategy=random", "sweep.beta={min: 0.1, max: true}"], ("sweep.beta",)),
    "sweep-infinite-in-list": (["sweep.strategy=grid", "sweep.learning_rate=[.inf]"], ("sweep.learning_rate",)),
    "sweep-log-not-a-boolean": (["sweep.strategy=random", "sweep.beta={min: 0.1, max: 1.0, log: 'yes'}"],
                                ("sweep.beta", "log")),
    "sweep-range-under-grid": (["sweep.strategy=grid", "sweep.beta={min: 0.1, max: 1.0}"], ("sweep.beta",)),
    "unknown-key-deep-in-lora": (["model.lora.alpah=16"], ("model.lora.alpah", "unknown key")),
    "unknown-key-in-benchmark-entry": (["benchmarks=[{kind: perplexity, name: p, data: x.jsonl, lmit: 3}]"],
                                       ("benchmarks.0", "lmit", "unknown key")),
    "true-as-benchmark-limit": (["benchmarks=[{kind: perplexity, name: p, data: x.jsonl, limit: true}]"],
                                ("benchmarks.0", "limit")),
    "study-unknown-key-in-arm-train": (["study.dpo_only.train.max_stpes=3"], ("study.dpo_only.train.max_stpes",)),
    "study-true-as-sft-steps": (["study.sft.max_steps=true"], ("study.sft.max_steps",)),
    "study-absurd-arm-batch": (["study.sft_then_dpo.train.batch_size=10000000000"],
                               ("study.sft_then_dpo.train.batch_size",)),
    "study-arm-sweep-range-reversed": (["study.dpo_only.sweep={strategy: random, beta: {min: 1.0, max: 0.5}}"],
                                       ("study.dpo_only.sweep.beta",)),
    "study-infinite-eval-cpus": (["study.eval_cpus=.inf"], ("study.eval_cpus",)),
    "section-as-a-number": (["model=5"], ("model", "section")),
    "huge-text-for-a-number": (["dpo.beta=" + "x" * 100_000], ("dpo.beta",)),
    "huge-list-for-a-number": (["dpo.beta=[" + ", ".join(["1"] * 4_000) + "]"], ("dpo.beta",)),
    "huge-set-value": (["data.columns={" + ", ".join(f"k{i}: v" for i in range(5_000)) + "}"], ("--set", "data.columns")),
    # the --set syntax itself
    "set-malformed-yaml-value": (["dpo.beta=[0.1,"], ("--set", "dpo.beta")),
    "set-malformed-flow-mapping": (["sweep.beta={min: 0.1"], ("--set", "sweep.beta")),
    "set-through-a-value": (["name.first=x"], ("--set", "name", "not a section")),
    "set-empty-key": (["=5"], ("--set", "empty part")),
    "set-empty-key-part": (["dpo..beta=0.2"], ("--set", "dpo..beta")),
    "set-without-equals": (["dpo.beta"], ("--set", "key=value")),
    "set-duplicate-key-in-value": (["sweep.beta={min: 0.1, min: 0.2, max: 1}"], ("--set", "min", "twice")),
    "set-alias-bomb-value": (["data.columns=" + ALIAS_BOMB.replace("\n", ", ").join("{}")], ("--set",)),
    "set-huge-malformed-value": (["dpo.beta=[" + "0.1, " * 50_000], ("--set", "dpo.beta")),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", SET_CASES, ids=list(SET_CASES))
def test_bad_set_value_is_refused_naming_the_key(world, tmp_path, case, command):
    overrides, names = SET_CASES[case]
    config = text_file(lambda t: t)(world, tmp_path)
    argv = [command, str(config)]
    for override in overrides:
        argv += ["--set", override]
    outcome = refused(argv, names=names, untouched=[config, *guarded(world, tmp_path)["untouched"]],
                      must_not_exist=guarded(world, tmp_path)["must_not_exist"], written_roots=[tmp_path])
    assert "x" * 100 not in outcome.stderr and "1, " * 40 not in outcome.stderr, "a whole bad value was printed"
    assert "Traceback" not in outcome.stderr


# ---- command-line flags ----------------------------------------------------------------------------

def storage(tmp_path: Path) -> list[str]:
    (tmp_path / "empty-storage").mkdir(exist_ok=True)
    return ["--storage-path", str(tmp_path / "empty-storage")]


FLAG_CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "log-level-not-a-level": (lambda tmp: ["--log-level", "verbose", "check", str(tmp / "c.yaml")], ("--log-level",)),
    "log-level-huge": (lambda tmp: ["--log-level", "v" * 100_000, "check", str(tmp / "c.yaml")], ("--log-level",)),
    "log-level-number": (lambda tmp: ["--log-level", "10", "check", str(tmp / "c.yaml")], ("--log-level",)),
    "unknown-flag-with-huge-value": (lambda tmp: ["check", str(tmp / "c.yaml"), "--bogus", "y" * 100_000], ("--bogus",)),
    "tie-tolerance-nan": (lambda tmp: ["analyze", "sweep", "--tie-tolerance", "nan", *storage(tmp)], ("--tie-tolerance",)),
    "benchmark-tolerance-text": (lambda tmp: ["analyze", "sweep", "--benchmark-tolerance", "lots", *storage(tmp)],
                                 ("--benchmark-tolerance",)),
    "kl-budget-nan": (lambda tmp: ["analyze", "sweep", "--kl-budget", "nan", *storage(tmp)], ("--kl-budget",)),
    "analyze-neither-config-nor-name": (lambda tmp: ["analyze", "../some/where", *storage(tmp)], ("sweep name",)),
    "analyze-bare-name-empty-storage": (lambda tmp: ["analyze", "nosuch", *storage(tmp)], ("nosuch", "mlflow.db")),
    "export-bare-name-empty-storage": (lambda tmp: ["export", "nosuch", "--out", str(tmp / "exported"), *storage(tmp)],
                                       ("nosuch", "mlflow.db")),
    "export-set-without-config": (lambda tmp: ["export", "nosuch", "--out", str(tmp / "exported"), "--set", "a=1",
                                               *storage(tmp)], ("--set",)),
}


@pytest.mark.parametrize("case", FLAG_CASES, ids=list(FLAG_CASES))
def test_bad_flag_is_refused(tmp_path, case):
    build, names = FLAG_CASES[case]
    outcome = refused(build(tmp_path), names=names, must_not_exist=[tmp_path / "exported"], written_roots=[tmp_path])
    assert "v" * 400 not in outcome.stderr and "y" * 400 not in outcome.stderr


def test_log_level_is_case_insensitive(tmp_path):
    outcome = run_cli(["--log-level", "warning", "check", str(tmp_path / "missing.yaml")])
    assert outcome.code == 2 and "does not exist" in outcome.stderr  # the level was accepted; the config is missing


# ---- secrets on error paths ------------------------------------------------------------------------

class FakeTracking(BaseHTTPRequestHandler):
    """A tracking server that is healthy but knows no experiment; under /deny it refuses every credential."""

    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        if self.path.startswith("/deny"):
            self.send_response(401)
            self.end_headers()
            return
        healthy = self.path.split("?")[0].endswith("/health")
        body = b"OK" if healthy else json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none"}).encode()
        self.send_response(200 if healthy else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@pytest.fixture(scope="module")
def tracking_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTracking)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


SECRET_CASES: dict[str, tuple[Callable[[int, Path], list[str]], dict[str, str], tuple[str, ...]]] = {
    # id: (argv from the fake server's port, environment, what the message must name)
    "analyze-password-in-uri": (lambda port, tmp: ["analyze", "nosuch", "--tracking-uri",
                                                   f"http://alice:{SECRET}@127.0.0.1:{port}"], {}, ("nosuch",)),
    "export-password-in-uri": (lambda port, tmp: ["export", "nosuch", "--out", str(tmp / "exported"), "--tracking-uri",
                                                  f"http://alice:{SECRET}@127.0.0.1:{port}"], {}, ("nosuch",)),
    "analyze-token-in-query": (lambda port, tmp: ["analyze", "nosuch", "--tracking-uri",
                                                  f"http://127.0.0.1:{port}/?token={SECRET}"], {}, ("nosuch",)),
    "analyze-token-as-uri-user": (lambda port, tmp: ["analyze", "nosuch", "--tracking-uri",
                                                     f"http://{SECRET}@127.0.0.1:{port}"], {}, ("nosuch",)),
    "analyze-credentials-refused": (lambda port, tmp: ["analyze", "nosuch", "--tracking-uri",
                                                       f"http://alice:{SECRET}@127.0.0.1:{port}/deny"], {}, ("credentials",)),
    "analyze-uri-from-environment": (lambda port, tmp: ["analyze", "nosuch"],
                                     {"MLFLOW_TRACKING_URI": f"http://alice:{SECRET}@127.0.0.1:{{port}}"}, ("nosuch",)),
    "export-bad-port-in-uri": (lambda port, tmp: ["export", "nosuch", "--out", str(tmp / "exported"), "--tracking-uri",
                                                  f"http://alice:{SECRET}@127.0.0.1:notaport"], {}, ("tracking URI",)),
    "secret-env-var-in-a-bad-value": (lambda port, tmp: ["check", str(tmp / "c.yaml"), "--set",
                                                         f"tracking.experiment=[{SECRET}]"],
                                      {"MLFLOW_TRACKING_PASSWORD": SECRET}, ("tracking.experiment",)),
    "secret-named-key-in-a-bad-value": (lambda port, tmp: ["check", str(tmp / "c.yaml"), "--set",
                                                           f"tracking.uri={{password: {SECRET}}}"], {}, ("tracking.uri",)),
    "uri-password-in-a-bad-value": (lambda port, tmp: ["check", str(tmp / "c.yaml"), "--set",
                                                       f"tracking.uri=[https://alice:{SECRET}@host]"], {}, ("tracking.uri",)),
    "secret-named-key-in-malformed-set": (lambda port, tmp: ["check", str(tmp / "c.yaml"), "--set",
                                                             f"data.columns.api_key=[{SECRET}"], {}, ("--set",)),
    "secret-named-unknown-key": (lambda port, tmp: ["train", str(tmp / "c.yaml"), "--set", f"tracking.password={SECRET}"],
                                 {}, ("tracking.password", "unknown key")),
    "uri-password-with-a-bad-row": (lambda port, tmp: ["train", str(tmp / "c.yaml"), "--set",
                                                       f"tracking.uri=https://alice:{SECRET}@127.0.0.1:9",
                                                       "--set", "data.max_length=1"], {}, ("data.max_length",)),
}


@pytest.mark.parametrize("case", SECRET_CASES, ids=list(SECRET_CASES))
def test_no_secret_is_shown_on_an_error_path(world, tmp_path, tracking_port, monkeypatch, case):
    build, environment, names = SECRET_CASES[case]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value.replace("{port}", str(tracking_port)))
    (tmp_path / "c.yaml").write_text(valid_yaml(world, tmp_path))
    refused(build(tracking_port, tmp_path), names=names, untouched=[tmp_path / "c.yaml"],
            must_not_exist=[tmp_path / "exported", tmp_path / "out"], written_roots=[tmp_path])


def test_log_records_are_redacted_arguments_and_tracebacks_included(monkeypatch):
    """Whatever a command logs (its arguments and exception text included) comes out redacted."""
    from orchestrator.cli import main as cli

    def noisy(args) -> int:
        log = logging.getLogger("orchestrator.adversarial")
        log.warning("connecting to %s", f"https://alice:{SECRET}@host")
        try:
            raise RuntimeError(f"token={SECRET} rejected by https://bob:{SECRET}@host")
        except RuntimeError:
            log.exception("it failed")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "config-reference", cli.Command("noisy", lambda parser: None, noisy))
    outcome = run_cli(["config-reference"])
    assert outcome.code == 0 and "connecting to https://alice:***@host" in outcome.logs
    assert SECRET not in outcome.everything


def test_a_bug_keeps_its_traceback_but_not_its_secret(monkeypatch):
    """An exception that is not a user error is a bug: exit 1 with a traceback, redacted."""
    from orchestrator.cli import main as cli

    def broken(args) -> int:
        raise KeyError(f"https://alice:{SECRET}@host")

    monkeypatch.setitem(cli.COMMANDS, "config-reference", cli.Command("broken", lambda parser: None, broken))
    outcome = run_cli(["config-reference"])
    assert outcome.escaped is None and outcome.code == 1
    assert "Traceback (most recent call last)" in outcome.stderr and "KeyError" in outcome.stderr
    assert SECRET not in outcome.everything


def test_private_text_is_redacted_owner_only_and_never_follows_a_link(tmp_path):
    from orchestrator.tracking.records import write_config_yaml

    path = write_config_yaml(tmp_path / "config.yaml", {"tracking": {"uri": f"https://alice:{SECRET}@host"},
                                                         "model": {"hf_token": SECRET}})
    assert SECRET not in path.read_text() and path.stat().st_mode & 0o777 == 0o600
    (tmp_path / "elsewhere.txt").write_text("keep")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(OSError):
        write_config_yaml(tmp_path / "link.yaml", {"name": "x"})
    assert (tmp_path / "elsewhere.txt").read_text() == "keep"
