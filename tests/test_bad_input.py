"""Bad input through the real command line (issue 18): each row is a file or setting a user might give,
run as `python -m jointrag ...` in a subprocess. Every row must end with exit status 2, one
`jointrag: error:` line on stderr that names what is wrong and where, no traceback, and no `--out`
directory left behind (these fail before anything is written)."""

from __future__ import annotations

import os
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
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jointrag: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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
