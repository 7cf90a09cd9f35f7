"""kdtool.deploy: benchmarks across backends and an ONNX Runtime inference server."""
