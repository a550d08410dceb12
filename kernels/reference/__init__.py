"""Pure-Python twins of the Cython kernels: the oracle for tests and the fallback."""
