.PHONY: demo test bench

# Set up, build the index over the embedded corpus, answer the test questions, print the metrics.
demo:
	bash scripts/setup.sh
	.venv/bin/jointrag eval

# Set up with the test tools and run the test suite.
test:
	bash scripts/setup.sh --dev
	.venv/bin/python -m pytest -q

bench:
	bash scripts/setup.sh --dev
	.venv/bin/python benchmarks/bench_retrieval.py
