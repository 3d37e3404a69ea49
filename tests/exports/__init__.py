"""Tests of exports/ (aicert.exports)."""
