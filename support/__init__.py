"""Test and benchmark support, outside the package (never importable from ``dali_arb``): loopback servers
(``loopback``: moto's S3, a fault-injecting proxy, a range HTTP server) and the per-image planning oracle
(``reference``). Tests and benchmarks run from the repository root, which puts this folder on the path."""
