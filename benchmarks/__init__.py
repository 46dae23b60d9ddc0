"""Benchmarks of shammie's ops against their peers; installed as shammie.benchmarks (see setup.py)."""
