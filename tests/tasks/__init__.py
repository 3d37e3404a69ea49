"""Tests of tasks/ (aicert.tasks)."""
