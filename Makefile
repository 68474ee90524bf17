.PHONY: demo test bench

# Set up, build the index over the embedded corpus, train JSA-RAG, print zero-shot vs trained metrics.
demo:
	bash scripts/demo.sh

# Set up with the test tools and run the test suite.
test:
	bash scripts/setup.sh --dev
	.venv/bin/python -m pytest -q

bench:
	bash scripts/setup.sh --dev
	.venv/bin/python benchmarks/bench_retrieval.py
	.venv/bin/python benchmarks/bench_training.py
