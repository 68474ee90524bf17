"""Bad input through the real command line (issue 18): each row is a file or setting a user might give,
run as `python -m jointrag ...` in a subprocess. Every row must end with exit status 2, one
`jointrag: error:` line on stderr that names what is wrong and where (after nothing but the progress
bars of work done before the fault was found), no traceback, and no `--out`
directory left behind (these fail before anything is written)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from jointrag import __version__

CONFIGS = {  # name: (config file bytes, fragment the error line must hold)
    "duplicate key": (b"train:\n  steps: 3\n  steps: 5\n", "line 3: 'train.steps' is given twice (first at line 2)"),
    "python tag": (b"train:\n  steps: !!python/object/apply:os.system ['true']\n", "line 2: 'train.steps': not a plain YAML value"),
    "not utf-8": (b"train:\n  steps: 3 # \xff\xfe\n", "not UTF-8 text"),
    "not yaml": (b"train: [\n", "not valid YAML"),
    "negative steps": (b"train:\n  steps: -1\n", "'train.steps'"),
    "unknown key": (b"train:\n  stepz: 3\n", "stepz"),
}
SETS = {  # --set value: fragment
    "train.steps=[": "--set train.steps=[: not a plain YAML value",
    "train.steps": "expected KEY=VALUE",
    "train.lr_generator=!!python/name:os.system": "not a plain YAML value",
}


def jointrag(*argv, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "JOINTRAG_HOME": str(cwd / "home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "jointrag", *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def assert_one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip()]
    *before, last = lines
    assert last.startswith("jointrag: error: "), done.stderr
    assert all(re.search(r"/s\]\s*$", line) for line in before), done.stderr  # progress bars of the work done before it only
    for fragment in fragments:
        assert fragment in last, last


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_a_bad_config_file_is_one_line_naming_the_file_and_line(tmp_path, case):
    content, fragment = CONFIGS[case]
    config = tmp_path / "recipe.yaml"
    config.write_bytes(content)
    done = jointrag("train", "--config", config, "--out", tmp_path / "run", cwd=tmp_path)
    assert_one_error_line(done, str(config), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", sorted(SETS))
def test_a_bad_set_is_one_line(tmp_path, setting):
    done = jointrag("train", "--set", setting, "--out", tmp_path / "run", cwd=tmp_path)
    assert_one_error_line(done, SETS[setting])
    assert not (tmp_path / "run").exists()


def test_version(tmp_path):
    done = jointrag("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"jointrag {__version__}"


RANGES = {  # --set value: fragment; refused while the settings are read, before any model loads (in-process)
    "train.lr_generator=-1e-5": "'train.lr_generator' must be at least 0",
    "train.lr_retriever=-1": "'train.lr_retriever' must be at least 0",
    "train.weight_decay=-0.1": "'train.weight_decay' must be at least 0",
    "train.max_grad_norm=-1": "'train.max_grad_norm' must be at least 0",
    "train.save_every=-2": "'train.save_every' must be at least 0",
    "train.eval_every=-1": "'train.eval_every' must be at least 0",
    "train.warmup_steps=-1": "'train.warmup_steps' must be at least 0",
    "train.dist_timeout=0": "'train.dist_timeout' must be positive",
    "train.seed=-1": "'train.seed' must be at least 0",
    "eval.limit=-1": "'eval.limit' must be at least 0",
    "method.tau=.nan": "'method.tau' must be a finite number",
    "method.tau=.inf": "'method.tau' must be a finite number",
    "method.beta=-1": "'method.beta' must be at least 0",
    "model.lora_dropout=1.5": "'model.lora_dropout' must be at least 0 and below 1",
}


@pytest.mark.parametrize("setting", sorted(RANGES))
def test_an_out_of_range_setting_is_refused(capsys, tmp_path, setting):
    from cli_helpers import assert_user_error

    assert_user_error(capsys, "train", "--set", setting, "--out", tmp_path / "run", names=(setting.split("=")[0], RANGES[setting]))
    assert not (tmp_path / "run").exists()


# --- files and arguments through the real command line, on the tiny models -------------------------


def damaged(index_dir: str, tmp_path, damage) -> str:
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(index_dir, copy)
    damage(copy)
    return str(copy)


def without_corpus(directory) -> None:
    import json

    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["corpus"]
    (directory / "manifest.json").write_text(json.dumps(manifest))


INDEX_DAMAGE = {  # name: (damage, fragment)
    "truncated embeddings": (lambda d: (d / "embeddings.npy").write_bytes((d / "embeddings.npy").read_bytes()[:100]),
                             "embeddings.npy: unreadable or truncated"),
    "missing embeddings": (lambda d: (d / "embeddings.npy").unlink(), "embeddings.npy: missing"),
    "foreign embeddings": (lambda d: __import__("numpy").save(d / "embeddings.npy", __import__("numpy").zeros((3, 7), "float32")),
                           "belongs to another index"),
    "manifest without corpus": (without_corpus, "manifest.json: field 'corpus' is missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(INDEX_DAMAGE))
def test_a_damaged_index_is_one_line(tmp_path, index_dir, case):
    damage, fragment = INDEX_DAMAGE[case]
    directory = damaged(index_dir, tmp_path, damage)
    assert_one_error_line(jointrag("retrieve", "--index", directory, "capital of France", cwd=tmp_path), directory, fragment)


@pytest.fixture(scope="module")
def hnsw_dir(files, tiny_dir, tmp_path_factory) -> str:
    from jointrag.cli import main

    out = tmp_path_factory.mktemp("hnsw") / "index"
    assert main(["index", "--corpus", str(files["corpus"]), "--out", str(out), "--retriever", str(tiny_dir / "encoder"),
                 "--precision", "fp32", "--kind", "hnsw"]) == 0
    return str(out)


@pytest.mark.slow
def test_a_missing_faiss_file_is_one_line(tmp_path, hnsw_dir):
    directory = damaged(hnsw_dir, tmp_path, lambda d: (d / "index.faiss").unlink())
    assert_one_error_line(jointrag("retrieve", "--index", directory, "capital", cwd=tmp_path), "index.faiss: missing")


@pytest.mark.slow
@pytest.mark.parametrize("param, fragment", [("ef_search=-1", "ef_search=-1 must be a positive integer"),
                                             ("nprobe=4", "search setting 'nprobe' does not apply to an 'hnsw' index; it takes ef_search")])
def test_a_bad_search_setting_is_one_line(tmp_path, hnsw_dir, param, fragment):
    assert_one_error_line(jointrag("retrieve", "--index", hnsw_dir, "--param", param, "capital", cwd=tmp_path), fragment)


def test_hnsw_returns_k_results_when_k_exceeds_ef_search(hnsw_dir):
    from jointrag.retrieval.resolve import resolve_index

    scores, rows = resolve_index(hnsw_dir, params={"ef_search": 1}).search(["capital of France"], 6)
    assert (rows >= 0).all() and rows.shape == (1, 6)


@pytest.mark.slow
def test_bad_corpora_are_one_line(tmp_path, tiny_dir):
    encoder = tiny_dir / "encoder"
    done = jointrag("index", "--corpus", tmp_path, "--out", tmp_path / "a", "--retriever", encoder, cwd=tmp_path)
    assert_one_error_line(done, f"--corpus {tmp_path} is a directory")
    (tmp_path / "empty.jsonl").write_text("\n")
    done = jointrag("index", "--corpus", tmp_path / "empty.jsonl", "--out", tmp_path / "b", "--retriever", encoder, cwd=tmp_path)
    assert_one_error_line(done, f"{tmp_path / 'empty.jsonl'}: no passages")
    assert ".tmp-" not in done.stderr
    done = jointrag("index", "--corpus", tmp_path / "empty.jsonl", "--out", tmp_path / "c", "--param", "nlist=4", "--retriever", encoder,
                    cwd=tmp_path)
    assert_one_error_line(done, "index setting 'nlist' does not apply to an 'exact' index; it takes none")
    assert not any(p.name in ("a", "b", "c") or p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_empty_questions_are_one_line(tmp_path, index_dir):
    done = jointrag("retrieve", "--index", index_dir, "capital", "  ", cwd=tmp_path)
    assert_one_error_line(done, "question 2 is empty")
    (tmp_path / "none.jsonl").write_text("")
    done = jointrag("eval", "--index", index_dir, "--data", tmp_path / "none.jsonl", "--retrieval-only", "--out", tmp_path / "eval",
                    cwd=tmp_path)
    assert_one_error_line(done, f"{tmp_path / 'none.jsonl'}: no questions to evaluate")
    assert not (tmp_path / "eval").exists()


def test_gold_ids_missing_from_the_corpus_are_said(capsys, tmp_path, index_dir):
    import json

    from cli_helpers import run

    (tmp_path / "qa.jsonl").write_text(json.dumps({"id": "x", "question": "capital of France?", "answers": ["Paris"],
                                                   "gold_ids": ["no-such-passage"]}) + "\n")
    code, _, err = run(capsys, "eval", "--index", index_dir, "--data", tmp_path / "qa.jsonl", "--retrieval-only", "--out", tmp_path / "e")
    assert code == 0
    assert "1 of 1 gold passage ids are not in the corpus" in err and "'no-such-passage' of example 'x'" in err


@pytest.mark.slow
def test_damaged_model_files_are_one_line(tmp_path, index_dir, tiny_dir):
    import shutil

    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 2)
    done = jointrag("ask", "--index", index_dir, "--generator", tmp_path / "bad.gguf", "capital?", cwd=tmp_path)
    assert_one_error_line(done, f"cannot load generator '{tmp_path / 'bad.gguf'}'")
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_dir / "encoder", encoder)
    (encoder / "model.safetensors").write_bytes(b"garbage" * 10)
    done = jointrag("retrieve", "--index", index_dir, "--retriever", encoder, "capital", cwd=tmp_path)
    assert_one_error_line(done, f"cannot load retriever '{encoder}'")


@pytest.mark.parametrize("device, fragment", [("cuda", "no CUDA GPU is available"), ("tpu", "expected auto, cpu, cuda or cuda:N")])
def test_a_device_this_machine_lacks_is_one_line(capsys, monkeypatch, index_dir, tiny_dir, device, fragment):
    import torch

    from cli_helpers import assert_user_error
    from jointrag.runtime import DEVICE_VARIABLE

    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv(DEVICE_VARIABLE, "auto")  # restored after the test: main() sets it from --device
    assert_user_error(capsys, "ask", "--index", index_dir, "--generator", tiny_dir / "causal", "--device", device, "capital?",
                      names=(f"--device {device}", fragment))


def test_device_cpu_runs_on_the_cpu(capsys, monkeypatch, index_dir, tiny_dir):
    from cli_helpers import run
    from jointrag.runtime import DEVICE_VARIABLE, default_device

    monkeypatch.setenv(DEVICE_VARIABLE, "auto")
    code, _, err = run(capsys, "ask", "--index", index_dir, "--generator", tiny_dir / "causal", "--device", "cpu",
                       "--max-new-tokens", "2", "capital?")
    assert code == 0, err
    assert default_device().type == "cpu"


def test_an_out_under_a_file_is_refused_before_any_work(capsys, tmp_path, files, index_dir, tiny_dir, monkeypatch):
    """eval, index and dialog-data check --out before loading anything (the models would load first)."""
    from cli_helpers import assert_user_error
    from jointrag.retrieval import encoders

    blocker = tmp_path / "file"
    blocker.write_text("mine")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(encoders, "load_encoder", no_model)
    fragment = f"cannot create or write it ({blocker} is not a writable directory)"
    assert_user_error(capsys, "eval", "--index", index_dir, "--data", files["qa"], "--out", blocker / "eval", names=(fragment,))
    assert_user_error(capsys, "index", "--corpus", files["corpus"], "--retriever", tiny_dir / "encoder", "--out", blocker / "index",
                      names=(fragment,))
    assert_user_error(capsys, "dialog-data", "--input", files["qa"], "--out", blocker / "dialog", names=(fragment,))
    assert blocker.read_text() == "mine"
