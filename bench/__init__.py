"""The benchmark (bench_gopdater.py), its fake docker, and the smoke test that keeps it from rotting."""
