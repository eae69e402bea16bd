"""Benchmarks, the bucket report and plots: imported by the CLI, never by the library."""
