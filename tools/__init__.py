"""Tools: benchmarks, the five-family comparison and the converter for official weights; run as
python -m tools.NAME."""
