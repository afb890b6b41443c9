"""Low-level helpers the model and the engine share: global-batch operations over processes,
loss logging without host reads, and measurement records."""
