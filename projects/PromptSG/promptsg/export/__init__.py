"""The retrieval feature as an ONNX graph, checked, evaluated and timed against PyTorch."""
