# The few commands people need. Every target sets up what it needs on first use.
SHELL := /bin/bash
VENV = $(shell scripts/bootstrap.sh)
PY = PYTHONPATH=$(CURDIR) $(VENV)/bin/python

.PHONY: setup demo test test-fast test-vllm lint format typecheck protos protos-check bench kafka-start kafka-stop clean

setup:            ## Python environment (cached outside the clone) and the Kafka broker jars
	@$(PY) -c "from rlhf.kafka_local import ensure_jars; print('kafka jars:', ensure_jars())"

demo: setup       ## The whole loop locally on the tiny model (Kafka included); Ctrl-C stops it
	$(PY) -m rlhf demo $(ARGS)

test: setup protos-check lint  ## Everything CI runs: generated-code check, lint, type check, all tests
	$(PY) -m pytest $(PYTEST_ARGS)

test-vllm: setup  ## The engine tests on the vLLM engine (builds vLLM's environment once: scripts/vllm_env.sh)
	scripts/vllm_env.sh >/dev/null
	RLHF_VLLM_TESTS=1 $(PY) -m pytest -m vllm $(PYTEST_ARGS) tests/test_policy_engines.py

test-fast:        ## Tests only, stop at the first failure
	$(PY) -m pytest -x -q $(PYTEST_ARGS)

lint:             ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy rlhf services trainer bench

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos:           ## Regenerate rlhf/v1 from protos/
	scripts/gen_protos.sh

protos-check:     ## Fail if rlhf/v1 is stale
	scripts/gen_protos.sh --check

bench:            ## Run every benchmark (each prints a JSON line last)
	$(PY) bench/run_all.py

kafka-start:
	$(PY) -m rlhf kafka start

kafka-stop:
	$(PY) -m rlhf kafka stop

clean:
	rm -rf .rlhf .pytest_cache .mypy_cache .ruff_cache
