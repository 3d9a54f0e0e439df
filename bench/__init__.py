"""Benchmarks: PnG against separate dense models and a fully shared model (``python -m bench --help``)."""
