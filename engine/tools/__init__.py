"""Tools beside the GC path: the embedded server, synthetic data, the demo and a webhook receiver."""
