"""kdtool.export: ONNX export and TensorRT engines."""
