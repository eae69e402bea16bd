"""The framework-free loader: options, the planner factory, the external source, the DALI pipeline, decoders, workers, the session."""
