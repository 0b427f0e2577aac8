"""Performance scripts; run one from the repository root, e.g. ``python benchmarks/bench_label.py --quick``."""
