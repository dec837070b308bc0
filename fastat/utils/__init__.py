"""Helpers every layer may use: one-line error messages and the benchmark timing harness."""
