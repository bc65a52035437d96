"""Benchmarks and results scripts (`python bench/<script>.py`), installed with the project so
they import `pipeline` and `bench.benchlib` from any working directory."""
