"""Synthetic toy world with exact object masks (training data + edit benchmark)."""
