"""kpbench's Python harness: cluster model → writers → loaders → kernels → measure → results."""
__version__ = "0.1.0"
