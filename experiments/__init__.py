"""absl entry points, the shared experiment runtime, benchmarks and the demo."""
