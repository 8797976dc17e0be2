# The two commands a newcomer runs (see README): `make demo` and `make test`.
.PHONY: install demo test bench

install:
	bash scripts/install.sh

demo: install
	.venv/bin/thrifty generate "What is the capital of France?"

test: install
	.venv/bin/python -m pytest

bench: install
	.venv/bin/python benchmarks/bench_generate.py
