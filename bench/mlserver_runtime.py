"""A minimal ONNX Runtime runtime for MLServer, for bench/mlserver_compare.py.

MLServer (PyPI ``mlserver``) has no ONNX runtime of its own; this is the custom runtime
its documentation describes: an ``MLModel`` subclass with ``load`` and ``predict``.
Adaptive batching (``max_batch_size`` / ``max_batch_time`` in model-settings.json) is
MLServer's: it concatenates the requests' inputs along the first axis before
``predict`` and splits the outputs afterwards.  It runs inside MLServer's own virtual
environment, never imported by kdtool.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self.settings)
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        opts = ort.SessionOptions()
        # The same session options as kdtool serve, so that only the servers differ.
        opts.intra_op_num_threads = int(extra.get("threads", 0))
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(uri, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = self._session.run([self._output], {self._input: x})[0]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(self._output, y)],
        )
