"""confeti: a from-scratch, pure-PyTorch, notebook-first reproduction of CONFETI (CVPR-W 2023)."""

__version__ = "0.1.0"
