"""Tools around the worker: the sample/load producer, the demo, the benchmark."""
