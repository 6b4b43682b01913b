.PHONY: setup demo test bench
setup:
	scripts/setup.sh
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	scripts/setup.sh --test && .venv/bin/python benchmarks/run_all.py
