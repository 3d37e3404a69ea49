"""Tests of guest_runtime/ (aicert.guest_runtime)."""
