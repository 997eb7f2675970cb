"""attnrewrite: find softmax attention in exported models, rewrite it, and audit the drift."""

__version__ = "0.1.0"
