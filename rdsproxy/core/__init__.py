"""The engine-agnostic core: pools, limits and metrics."""
