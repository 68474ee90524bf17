"""The page of `jointrag serve` in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven
by Playwright) against `jointrag serve` started on the tiny models in its own process on a free
127.0.0.1 port. A person types a question and sees the answer stream into both models' columns, then
the passages with their scores and the ones given to the generator; the run view shows a run's curves
and the questions on which two runs disagree. Screenshots are saved under the test's tmp directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cli_helpers import write_jsonl
from conftest import QA

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
QUESTION = "What is the capital of France?"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two evaluated runs disagreeing on q2, the first with real training curves (`jointrag plot`)."""
    from jointrag.evaluation.plot import plot_run

    root = tmp_path_factory.mktemp("browser-runs")
    a, b = root / "jsa", root / "rag"
    a.mkdir()
    b.mkdir()
    write_jsonl(a / "metrics.jsonl", [{"step": s, "split": "train", "loss": 3.0 / s} for s in range(1, 6)]
                + [{"step": 5, "split": "eval", "em": 40.0, "f1": 50.0}])
    assert plot_run(a)
    rows = [{"id": q["id"], "question": q["question"], "answers": q["answers"], "prediction": q["answers"][0], "em": 1.0, "f1": 1.0}
            for q in QA]
    write_jsonl(a / "predictions.jsonl", rows)
    write_jsonl(b / "predictions.jsonl", [dict(r, prediction="Lyon", em=0.0, f1=0.0) if r["id"] == "q2" else r for r in rows])
    return a, b


@pytest.fixture(scope="module")
def checkpoint(files, index_dir, tiny_dir, tmp_path_factory) -> Path:
    """A tiny RAG-Sequence model trained for 2 steps: what `--compare` sets beside the untrained one."""
    import jointrag

    out = tmp_path_factory.mktemp("browser-train") / "run"
    jointrag.train(method="rag-sequence", data=files["qa"], data__dev=files["qa"], index=index_dir, out=out, steps=2,
                   model__generator=str(tiny_dir / "causal"), train__batch_size=2, train__lr_generator=1e-2,
                   train__precision="fp32", method__k=3, eval__limit=1, eval__max_new_tokens=2)
    return out / "checkpoint"


@pytest.fixture(scope="module")
def server(index_dir, tiny_dir, runs, checkpoint, tmp_path_factory):
    """`jointrag serve` in a subprocess: main = the tiny causal LM over the index, compare = the trained
    checkpoint; its URL."""
    home = tmp_path_factory.mktemp("browser-home")
    env = {**os.environ, "JOINTRAG_HOME": str(home), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "jointrag", "serve", "--index", index_dir, "--generator", str(tiny_dir / "causal"),
               "--compare", str(checkpoint), "--precision", "fp32", "--port", "0", "--run", str(runs[0]), "--run", str(runs[1]),
               "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def test_a_question_streams_its_answer_and_shows_the_passages(server, browser, tmp_path):
    expected = {name: httpx.post(f"{server}v1/answer", json={"question": QUESTION, "model": name}, timeout=60).json()["answers"][0]
                for name in ("main", "compare")}
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(server)
    page.wait_for_selector('[data-model="compare"]')
    # every text the main column's answer shows on its way, to see it arrive in pieces
    page.evaluate("""() => {
        window.shown = [];
        const answer = document.querySelector('[data-model="main"] .answer');
        new MutationObserver(() => window.shown.push(answer.textContent)).observe(answer, {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#question", QUESTION)
    page.press("#question", "Enter")
    assert "checkpoint" in page.locator('[data-model="compare"] .model').inner_text()
    for name in ("main", "compare"):
        column = page.locator(f'[data-model="{name}"]')
        column.locator(".passages li").nth(4).wait_for()  # k = 5 passages, shown once the answer is done
        shown = column.locator(".answer").inner_text()
        assert shown == (expected[name]["answer"] or "(no answer)")
        assert "streaming" not in column.locator(".answer").get_attribute("class")
        items = column.locator(".passages li")
        assert items.count() == 5
        assert [items.nth(i).locator(".meta").inner_text().split(" · ")[1] for i in range(5)] == [p["id"] for p in expected[name]["passages"]]
        assert f"score {expected[name]['passages'][0]['score']:.4f}" in items.nth(0).inner_text()
        assert column.locator("li.used").count() == 1 and "given to the generator" in column.locator("li.used").inner_text()
        assert "retrieval" in column.locator(".timings").inner_text()
    pieces = page.evaluate("window.shown")
    assert len(set(pieces)) > 2, pieces  # the main answer grew piece by piece before the passages came
    assert all(expected["main"]["answer"].startswith(text) for text in pieces if text and text != "(no answer)")
    marked = page.evaluate("() => [...highlighted('Paris is the capital of France. paris!', 'Paris').querySelectorAll('mark')].map(m => m.textContent)")
    assert marked == ["Paris", "paris"]
    path = tmp_path / "serve.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    page.close()


def test_a_bad_question_shows_the_servers_message(server, browser):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_selector('[data-model="main"]')
    page.fill("#question", "why? " * 1000)
    page.click("#ask")
    error = page.locator('[data-model="main"] .answer.error')
    error.wait_for()
    assert "question: String should have at most 4000 characters" in error.inner_text()
    page.fill("#question", QUESTION)  # the server still answers
    page.click("#ask")
    page.locator('[data-model="main"] .passages li').nth(4).wait_for()
    page.close()


def test_the_run_view_shows_curves_and_where_two_runs_disagree(server, browser, runs, tmp_path):
    a, b = (str(r) for r in runs)
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(f"{server}runs?dir={a}&other={b}")
    page.locator("#predictions tbody tr").nth(len(QA) - 1).wait_for()
    images = page.locator("#plots img")
    assert images.count() >= 1
    page.wait_for_function("() => [...document.querySelectorAll('#plots img')].every(i => i.complete && i.naturalWidth > 100)")
    assert "of 4 questions shown; the runs disagree on 1" in page.locator("#summary").inner_text()
    page.check("#only-disagree")
    page.wait_for_function("() => document.querySelectorAll('#predictions tbody tr').length === 1")
    row = page.locator("#predictions tbody tr").inner_text()
    assert "Who won Super Bowl 50?" in row and "Lyon" in row and "Denver Broncos" in row
    path = tmp_path / "runs.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    page.close()
