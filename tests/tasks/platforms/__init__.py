"""Tests of tasks/platforms/ (aicert.tasks.platforms)."""
