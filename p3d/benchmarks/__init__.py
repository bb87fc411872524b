"""The benchmarks of `p3d bench NAME`: each module has `run(repeats: int, quick: bool) -> dict`."""
