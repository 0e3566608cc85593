"""Data preparation (prepare.py); prepared corpora live in the folders beside it."""
