"""transformer: the Transformer of "Attention Is All You Need" as real, fast software."""

__version__ = "0.1.0"
