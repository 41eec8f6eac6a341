"""Benchmarks of pyroflows against its peers; they print tables and never assert times."""
