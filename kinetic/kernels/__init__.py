"""Optional fast paths written outside PyTorch, each behind a capability check with torch's own
operators as the fallback (see :mod:`kinetic.kernels.cpu`)."""
