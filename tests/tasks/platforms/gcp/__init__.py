"""Tests of the gcp platform."""
