"""``kdtool serve``: an ONNX Runtime inference server speaking the Open Inference Protocol.

Layout (each module small, the hot path free of torch):

* ``model``    the ONNX Runtime session, configured from the file's kdtool metadata;
* ``batcher``  dynamic batching: a bounded queue, one ORT call per batch off the event loop;
* ``protocol`` KServe v2 / Triton request parsing and response encoding (JSON and binary);
* ``images``   image decoding and the model's own preprocessing for ``/classify``;
* ``metrics``  Prometheus metrics, one registry per app;
* ``app``      the Starlette routes, auth, body limit and error handling;
* ``run``      binding, the start-up banner and uvicorn with graceful shutdown.
"""

from kdtool.deploy.server.app import ServerConfig, create_app
from kdtool.deploy.server.model import OnnxModel
from kdtool.deploy.server.run import serve

__all__ = ["OnnxModel", "ServerConfig", "create_app", "serve"]
