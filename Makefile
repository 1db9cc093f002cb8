# Hourglass — everything a new clone needs goes through these targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DB ?= hourglass.duckdb

.PHONY: install bytecode demo sample-traces test lint bench bench-ingest bench-analysis bench-api bench-import bench-scaling bench-files bench-whatif bench-soak bench-restart bench-serve-whole bench-cluster clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py hourglass/collector/_otlpscan.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Compiled bytecode of the package, kept fresh on every target that runs it: the install is editable,
# so pip compiles nothing, and where PYTHONDONTWRITEBYTECODE is set (common in containers, and on the
# machines this is built on) Python would otherwise compile every module again in every process: the
# CLI and each of its worker processes (~0.6 s of a 1M-span `analyze --db`). Only stale files are
# compiled; a few hundred ms the first time, nothing after.
bytecode: install
	$(PY) -m compileall -q hourglass

# Starts `hourglass serve` on the embedded DuckDB store, runs the sample workload through the
# real OTLP exporter and prints the ranked recommendations.
demo: install bytecode
	$(PY) -m hourglass.demo --db $(DB)

# Regenerates sample-traces/ from the instrumented workload (about 20 s; see sample-traces/README.md).
sample-traces: install
	PYTHON=$(PY) scripts/generate-sample-traces

# Every test, on TEST_WORKERS pytest-xdist workers (0: in this one process). Most tests wait on
# servers, CLI processes and sockets, so two workers overlap well on two cores; tests/conftest.py
# keeps the tests of a module-wide fixture on one worker. Installs headless Chromium (Debian's
# package) for the report-page tests when root.
TEST_WORKERS ?= 2
test: install bytecode
	bash scripts/ensure-chromium
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: install
	$(VENV)/bin/ruff check hourglass tests bench deploy scripts
	$(VENV)/bin/mypy

bench: bench-ingest bench-analysis bench-api

# bench-ingest, -analysis, -api, -whatif and -scaling run bench/<name>.py (each prints its figure
# beside a baseline measured in the same run; see the README's Development section)
bench-ingest bench-analysis bench-api bench-whatif bench-scaling: bench-%: install bytecode
	$(PY) -m bench.$*

bench-import: install bytecode
	$(PY) -m bench.import_files

# `hourglass analyze FILE` of a 2M-span OTLP file: bounded by the memory budget, beside the whole
# file analysed at once (the baseline), and the same recommendations
bench-files: install bytecode
	$(PY) -m bench.files_scaling

# `hourglass serve` fed 20,000 spans/s for 10 minutes: RSS, settled traces vs the report, refusals,
# beside the whole-store re-analysis (HOURGLASS_INCREMENTAL_ANALYSIS=false). QUICK=1: 2 minutes each.
bench-soak: install bytecode
	$(PY) -m bench.soak_serve $(if $(QUICK),--quick,)

# `hourglass serve` restarted on a 10M-span store after a clean stop (its figures kept) and after a
# crash (rebuilt from every row, the baseline): until listening, until its first round ends
bench-restart: install bytecode
	$(PY) -m bench.restart_serve --stored 10M

# `hourglass serve`'s whole-store analysis of a 1M-span embedded ClickHouse store (not incremental):
# in partitions within the memory budget, beside the store analysed at once (the baseline)
bench-serve-whole: install bytecode
	$(PY) -m bench.serve_whole_store

# `hourglass analyze --db --cluster` of a 5M-span store on a real scheduler and two workers on
# 127.0.0.1 that read this machine's files, beside workers that act as on other machines (the baseline)
bench-cluster: install bytecode
	$(PY) -m bench.cluster

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
