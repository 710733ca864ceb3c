"""The offline lab: simulation runs, benchmarks, recording and training (`ailfm`)."""
