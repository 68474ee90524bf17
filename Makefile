.PHONY: demo test test-slow bench

# Set up, build the index over the embedded corpus, train JSA-RAG, print zero-shot vs trained metrics.
demo:
	bash scripts/demo.sh

# Set up with the test tools and run the test suite, without the tests marked slow (about 5 minutes).
test:
	bash scripts/setup.sh --dev
	.venv/bin/python -m pytest -q -m "not slow"

# The slow tests: kill -9 faults, the bad-input catalogue's subprocess rows, the browser, the campaign driver.
# CI (.ci/run) runs them after `make test`.
test-slow:
	bash scripts/setup.sh --dev
	.venv/bin/python -m pytest -q -m slow

# Run every benchmark on one thread; writes runs/bench/results.json and results.md. `make bench BENCH_ARGS=--quick`
# for a smoke run without the 1M-vector searches.
bench:
	bash scripts/setup.sh --dev
	OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_all.py $(BENCH_ARGS)
