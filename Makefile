.PHONY: demo test bench

# Set up, build the index over the embedded corpus, train JSA-RAG, print zero-shot vs trained metrics.
demo:
	bash scripts/demo.sh

# Set up with the test tools and run the test suite.
test:
	bash scripts/setup.sh --dev
	.venv/bin/python -m pytest -q

# Run every benchmark on one thread; writes runs/bench/results.json and results.md. `make bench BENCH_ARGS=--quick`
# for a smoke run without the 1M-vector searches.
bench:
	bash scripts/setup.sh --dev
	OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_all.py $(BENCH_ARGS)
