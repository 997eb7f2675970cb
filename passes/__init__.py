"""Rewrite passes, one module per attention-variant family."""
