"""The independent float64 oracle the tests and benchmarks compare against."""
