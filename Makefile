# The two entry points of the README. Each installs what it needs first.
VENV ?= .venv
AICERT_HOME ?= $(HOME)/.aicert
export AICERT_HOME

.PHONY: setup demo demo-lineage test lint schema

setup:
	bash deployments/setup-host.sh

## Certify the bundled example on the local platform (swtpm + Docker + Prefect), then verify it.
demo: setup
	$(VENV)/bin/aicert run --config examples/aicert.yaml --output-bom proof.json --outputs-dir outputs
	$(VENV)/bin/aicert verify proof.json --model outputs --allow-dev-platform \
		--trust-root $(AICERT_HOME)/platform-ca/platform-ca.cert.pem

## Lineage: certify pretrain -> fine-tune -> evaluate (each stage's model a certified input of
## the next, the evaluation's metrics certified), then verify the chain (examples/lineage).
demo-lineage: setup
	rm -rf lineage-demo
	$(VENV)/bin/python examples/lineage/run_lineage.py lineage-demo

## Lint, then the whole test suite on real components (swtpm, dockerd, Prefect, tpm2-tools).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -p no:cacheprovider -ra

schema:
	$(VENV)/bin/python -m aicert.schema > verification/schemas/aicert-v1.schema.json
	$(VENV)/bin/python -m aicert.policy > verification/schemas/aicert-policy-v1.schema.json
