"""On-demand benchmarks (``make bench``); not part of the package or the test suite."""
