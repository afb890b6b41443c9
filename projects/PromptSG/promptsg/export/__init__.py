"""The retrieval feature as an ONNX graph."""
