"""Loader throughput cases (filled in with the DALI pipeline)."""
