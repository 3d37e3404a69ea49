# The two entry points of the README. Each installs what it needs first.
VENV ?= .venv
AICERT_HOME ?= $(HOME)/.aicert
export AICERT_HOME

.PHONY: setup demo demo-finetune demo-lineage test lint schema

setup:
	bash deployments/setup-host.sh

## Certify the default demo (examples/aicert.yaml: scikit-learn on the bundled digits) on the
## local platform (swtpm + Docker + Prefect), then verify it and its certified accuracy.
DEMO_DIR ?= .
demo: setup
	$(VENV)/bin/aicert run --config examples/aicert.yaml \
		--output-bom $(DEMO_DIR)/proof.json --outputs-dir $(DEMO_DIR)/outputs
	$(VENV)/bin/aicert verify $(DEMO_DIR)/proof.json --model $(DEMO_DIR)/outputs \
		--allow-dev-platform --trust-root $(AICERT_HOME)/platform-ca/platform-ca.cert.pem \
		--expect-metric 'accuracy>=0.9'

## Fine-tune: the demo's network trained further for a new domain, its base model a pinned
## resource (examples/finetune); certified, then verified with the base model's digests.
FINETUNE_DIR ?= finetune-demo
demo-finetune: setup
	rm -rf $(FINETUNE_DIR)
	$(VENV)/bin/python examples/finetune/run_finetune.py $(FINETUNE_DIR)

## Lineage: certify pretrain -> fine-tune -> evaluate (each stage's model a certified input of
## the next, the evaluation's metrics certified), then verify the chain (examples/lineage).
demo-lineage: setup
	rm -rf lineage-demo
	$(VENV)/bin/python examples/lineage/run_lineage.py lineage-demo

## Lint, then the whole test suite on real components (swtpm, dockerd, Prefect, tpm2-tools).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -p no:cacheprovider -ra --durations=30

schema:
	$(VENV)/bin/python -m aicert.schema > verification/schemas/aicert-v1.schema.json
	$(VENV)/bin/python -m aicert.policy > verification/schemas/aicert-policy-v1.schema.json
