"""Open Inference Protocol (KServe v2 / Triton) inference requests and responses.

A request is a JSON object ``{"id", "parameters", "inputs": [{name, shape, datatype,
data | parameters.binary_data_size}], "outputs": [{name, parameters}]}``.  With the binary
tensor data extension, the header ``Inference-Header-Content-Length`` gives the size of
that JSON and the raw little-endian tensors follow it, in input order.  Outputs go back as
JSON ``data`` or, when asked (``binary_data`` on an output, ``binary_data_output`` on the
request), as raw bytes after the JSON in the same way.  The classification extension
(``classification: k`` on an output) returns the top k as ``"score:index:label"`` strings.

Every way a request can be wrong raises ``RequestError`` with a message saying what.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from kdtool.errors import message_line

V2_TO_NP: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
}
HEADER_LENGTH = "inference-header-content-length"
# zlib window bits per Content-Encoding ("deflate" is the zlib format, as clients send it)
WBITS = {"gzip": 31, "deflate": 15}
COMPRESS_MIN_BYTES = 1024  # smaller responses go out as they are


class RequestError(Exception):
    """A client error: ``status`` (400 unless said) and a message for ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class OutputRequest:
    name: str
    binary: bool
    classification: int = 0  # > 0: top k as "score:index:label" strings


@dataclass
class InferRequest:
    id: str | None
    x: np.ndarray
    outputs: list[OutputRequest]


def loads(data: bytes, what: str = "request body") -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise RequestError(f"{what} is not valid JSON: {e}") from None


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate request body (tritonclient's request_compression_algorithm)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in WBITS:
        raise RequestError(
            f"Content-Encoding '{encoding}' is not supported; use gzip or deflate", 415
        )
    d = zlib.decompressobj(WBITS[encoding])
    try:
        out = d.decompress(body, limit + 1)  # bounded: a zip bomb stops at the limit
    except zlib.error as e:
        raise RequestError(f"the {encoding} request body does not decompress: {e}") from None
    if len(out) > limit:
        raise RequestError("the decompressed request body is over the --max-body-mb limit", 413)
    if not d.eof:
        raise RequestError(f"the {encoding} request body is truncated")
    return out


def compress(body: bytes, accept: str | None) -> tuple[bytes, str | None]:
    """Compress a response when the client accepts it and it is worth it."""
    if not accept or len(body) < COMPRESS_MIN_BYTES:
        return body, None
    accepted = {a.split(";")[0].strip().lower() for a in accept.split(",")}
    for encoding in ("gzip", "deflate"):
        if encoding in accepted:
            c = zlib.compressobj(1, zlib.DEFLATED, WBITS[encoding])  # level 1: cheap
            return c.compress(body) + c.flush(), encoding
    return body, None


def parse_infer(body: bytes, header_length: str | None, model) -> InferRequest:
    """Validate a v2 inference request against ``model`` (an ``OnnxModel``)."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise RequestError(
                f"Inference-Header-Content-Length '{header_length}' is not an integer"
            ) from None
        if not 0 < json_size <= len(body):
            raise RequestError(
                f"Inference-Header-Content-Length {json_size} is outside the {len(body)}-byte body"
            )
        header, binary = loads(body[:json_size], "the inference header"), memoryview(body)
        offset = json_size
    else:
        header, binary, offset = loads(body), None, 0
    if not isinstance(header, dict):
        raise RequestError("an inference request must be a JSON object with 'inputs'")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("'inputs' must be a non-empty list of tensors")
    spec = model.input
    x = None
    for t in inputs:
        if not isinstance(t, dict):
            raise RequestError(
                "each entry of 'inputs' must be an object {name, shape, datatype, data}"
            )
        name = t.get("name")
        if name != spec.name:
            raise RequestError(
                f"unknown input {_q(name)}: model '{model.name}' takes one input, '{spec.name}'"
            )
        if x is not None:
            raise RequestError(f"input '{spec.name}' is given twice")
        x, offset = _tensor(t, spec, binary, offset)
    if binary is not None and offset != len(binary):
        raise RequestError(
            f"{len(binary) - offset} bytes after the binary tensors are not "
            "claimed by any input's binary_data_size"
        )
    rid = header.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("'id' must be a string")
    return InferRequest(rid, x, _outputs(header, model))


def _q(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else orjson.dumps(value).decode()[:80]


def _tensor(t: dict, spec, binary: memoryview | None, offset: int) -> tuple[np.ndarray, int]:
    name = spec.name
    datatype = t.get("datatype")
    if datatype != spec.datatype:
        raise RequestError(
            f"input '{name}' has datatype {_q(datatype)}; the model takes {spec.datatype}"
        )
    shape = t.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != len(spec.shape)
        or any(type(d) is not int for d in shape)  # bool is an int subclass
        or shape[0] < 1
        or list(shape[1:]) != list(spec.shape[1:])
    ):
        want = "[N, " + ", ".join(map(str, spec.shape[1:])) + "]"
        raise RequestError(
            f"input '{name}' has shape {_q(shape)}; the model takes {want} with N >= 1"
        )
    count = math.prod(shape)
    dtype = spec.dtype
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"input '{name}': 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if binary is None:
            raise RequestError(
                f"input '{name}' has binary_data_size but the request has no "
                "Inference-Header-Content-Length header"
            )
        if "data" in t:
            raise RequestError(f"input '{name}' has both 'data' and binary_data_size")
        if type(size) is not int or size != count * dtype.itemsize:
            raise RequestError(
                f"input '{name}': binary_data_size {_q(size)} does not match "
                f"shape {shape} of {datatype} ({count * dtype.itemsize} bytes)"
            )
        if offset + size > len(binary):
            raise RequestError(
                f"input '{name}' needs {size} bytes of binary data; the body "
                f"has {len(binary) - offset} after the header"
            )
        x = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
        x, offset = x.astype(dtype, copy=False).reshape(shape), offset + size
    else:
        data = t.get("data")
        if not isinstance(data, list):
            raise RequestError(f"input '{name}' has no 'data' list (nor binary_data_size)")
        x = _json_numbers(data, dtype, name, count)
        if x.size != count:
            raise RequestError(
                f"input '{name}' has {x.size} values in 'data'; shape {shape} needs {count}"
            )
        x = x.reshape(shape)
    if x.dtype.kind == "f":
        bad = count - int(np.count_nonzero(np.isfinite(x)))
        if bad:
            raise RequestError(f"input '{name}' has {bad} non-finite values (NaN, infinity "
                               "or JSON null)")
    return x, offset


def _json_numbers(data: list, dtype: np.dtype, name: str, count: int) -> np.ndarray:
    """JSON ``data`` as ``dtype``, refusing what numpy would quietly coerce.

    A direct ``np.array(data, dtype)`` turns true/false into 1/0, "1.5" into 1.5 and, for
    integer inputs, 2.7 into 2: a client bug would be served as if it were pixels.  Letting
    numpy infer first shows strings and fractions by the inferred kind; true/false, which
    numpy reads as 1/0 among numbers, are found by ``_first_bool``.
    """

    def refuse(reason: str):
        raise RequestError(
            f"input '{name}': 'data' must be {count} numbers (flat or nested by shape): {reason}"
        )

    try:
        raw = np.array(data)  # None -> object; mixed bool/number promotes to number
    except (ValueError, TypeError, OverflowError) as e:
        if "inhomogeneous" in str(e):  # numpy's words for it are about its own internals
            refuse("nested lists of different lengths (each level must be as long as the "
                   "shape says)")
        refuse(message_line(e, 200))
    found = _first_bool(data, raw)
    if found:
        refuse(f"true/false are not numbers (found {found})")
    if raw.dtype.kind == "O":  # null among numbers, or integers past 64 bits
        if not all(v is None or type(v) in (int, float) for v in raw.flat):
            refuse("found values that are not numbers")
        raw = raw.astype(np.float64)  # null -> NaN, refused below as non-finite
    if raw.dtype.kind in "US":
        refuse("found strings")
    if dtype.kind in "iu":
        if raw.dtype.kind == "f":
            refuse(f"{dtype.name} takes whole numbers (null, fractions and 2**64 are not)")
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            refuse(f"{dtype.name} holds {info.min}..{info.max}")
    with np.errstate(over="ignore"):  # 1e39 -> inf in FP32: reported by the caller
        return raw.astype(dtype)


def _first_bool(data: list, raw: np.ndarray) -> str | None:
    """The first true/false in ``data`` and where it is (``"true at data[0][3]"``), or None.

    ``np.array`` reads true/false among numbers as 1/0, and checking the type of every value
    costs about as much as parsing the JSON did.  So look only where ``raw`` holds a 0 or a 1
    (microseconds; float pixels are seldom exactly either) and check the JSON values there:
    one by one when they are few, all in one C-level pass when they are many (0/1 data).
    ``raw`` is regular to ``raw.ndim`` levels, so flattening that many levels of ``data``
    lines its values up with ``raw.ravel()``.
    """
    kind = raw.dtype.kind
    if kind == "b":  # all true/false (an empty list is float64)
        return f"{'true' if raw.flat[0] else 'false'} at data{_index(0, raw.shape)}"
    if kind == "O":  # null among numbers, or integers past 64 bits: a rare, slow path
        values, suspects = raw.ravel(), range(raw.size)
    elif kind in "iuf":
        mask = (raw == 0) | (raw == 1)  # where true/false went
        many = int(np.count_nonzero(mask))
        if not many:
            return None
        values = data
        for _ in range(raw.ndim - 1):
            values = list(itertools.chain.from_iterable(values))
        if many * 3 < raw.size:  # a few: one by one
            suspects = np.flatnonzero(mask).tolist()
        elif bool in map(type, values):  # many (0/1 data): one pass in C is cheaper
            suspects = range(raw.size)
        else:
            return None
    else:  # strings: refused as such
        return None
    i = next((i for i in suspects if type(values[i]) is bool), None)
    if i is None:
        return None
    return f"{'true' if values[i] else 'false'} at data{_index(i, raw.shape)}"


def _index(flat: int, shape: tuple[int, ...]) -> str:
    return "".join(f"[{j}]" for j in np.unravel_index(flat, shape))


def _outputs(header: dict, model) -> list[OutputRequest]:
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("request 'parameters' must be an object")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise RequestError("parameter binary_data_output must be true or false")
    wanted = header.get("outputs")
    if wanted is None or wanted == []:  # none named: all (the model's one), as Triton does
        return [OutputRequest(model.output.name, default_binary)]
    if not isinstance(wanted, list):
        raise RequestError("'outputs' must be a list of {name, parameters}")
    out = []
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else None
        if name != model.output.name:
            raise RequestError(
                f"unknown output {_q(name)}: model '{model.name}' has one "
                f"output, '{model.output.name}'"
            )
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise RequestError(f"output '{name}': 'parameters' must be an object")
        binary = p.get("binary_data", default_binary)
        k = p.get("classification", 0)
        if not isinstance(binary, bool):
            raise RequestError(f"output '{name}': binary_data must be true or false")
        if type(k) is not int or k < 0:
            raise RequestError(f"output '{name}': classification must be a count >= 0")
        out.append(OutputRequest(name, binary, min(k, model.info.num_classes)))
    return out


def encode_infer(req: InferRequest, y: np.ndarray, model) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs follow the JSON header)."""
    outputs, blobs = [], []
    for o in req.outputs:
        if o.classification:
            datatype, shape, value = "BYTES", [len(y), o.classification], _classes(y, o, model)
        else:
            datatype, shape, value = model.output.datatype, list(y.shape), y
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": shape}
        if o.binary:
            raw = _raw_bytes(value) if datatype == "BYTES" else _raw(value)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = (
                [s.decode() for s in value]
                if datatype == "BYTES"
                else np.ascontiguousarray(value).ravel()
            )
        outputs.append(entry)
    resp: dict[str, Any] = {"model_name": model.name, "model_version": "1"}
    if req.id is not None:
        resp["id"] = req.id
    resp["outputs"] = outputs
    body = dumps(resp)
    if not blobs:
        return body, {}
    return body + b"".join(blobs), {"Inference-Header-Content-Length": str(len(body))}


def _raw(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def _raw_bytes(strings: list[bytes]) -> bytes:
    """BYTES tensors on the wire: each element is a 4-byte little-endian length, then bytes."""
    return b"".join(struct.pack("<I", len(s)) + s for s in strings)


def _classes(y: np.ndarray, o: OutputRequest, model) -> list[bytes]:
    """Triton's classification extension: per row, the top k as "score:index:label"."""
    names = model.class_names
    top = np.argsort(-y, axis=1, kind="stable")[:, : o.classification]
    return [f"{y[r, c]:f}:{c}:{names[c]}".encode() for r in range(len(y)) for c in top[r]]
