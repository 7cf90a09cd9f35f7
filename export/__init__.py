"""kdtool.export: verified ONNX (FP32/FP16/INT8), TensorRT engines and Triton repositories.

Public pieces (imported from their modules; this package imports nothing heavy):

* ``formats.FORMATS``: the table of export formats (name, suffix, precisions, needs, runner).
* ``runners``: ``TorchRunner``, ``OrtRunner``, ``TrtRunner``, ``load_runner`` with one
  ``infer(x) -> logits`` / ``describe()`` interface.
* ``pipeline.ExportConfig`` + ``pipeline.run_export``: what ``kdtool export`` does.
* ``onnx_export.export_onnx``, ``precision.to_fp16`` / ``quantize_int8``,
  ``engine.build_engine``, ``triton.write_repo``: the steps, usable on their own.
* ``metadata``: the kdtool metadata inside an exported ONNX file.
"""
