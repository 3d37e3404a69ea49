"""AICert's Prefect integration: the ``certify-training`` flow, providers, blocks, builder CLI."""
