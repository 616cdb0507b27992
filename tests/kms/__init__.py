"""Tests of the KMS plugin."""
