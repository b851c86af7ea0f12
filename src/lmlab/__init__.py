"""lmlab: train, compare and sample neural language models from Hydra configs."""

__version__ = "0.1.0"
