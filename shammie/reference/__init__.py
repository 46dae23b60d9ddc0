"""Pure-torch implementations written from each op's math: the references the tests compare
against (run in float64) and the peers the benchmarks time."""
