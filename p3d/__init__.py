"""The application layer: one command line (`p3d`, p3d/cli.py) over the core (`perception3d/`) and
both halves (`detection/`, `splatting/`), the task registry (p3d/tasks.py), the benchmarks and the
viewer. The scripts in tools/ are thin wrappers around these commands."""
