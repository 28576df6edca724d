"""Load and save ONNX models with external data, without ever touching the input files.

Loading keeps weights in the external data files, memory-mapped by ``onnx_ir``. Saving writes
every tensor of 1 KiB or more to one data file beside the model (``<output>.data``), so the
protobuf never nears its 2 GB limit. Outputs are written into a staging directory next to the
final place and moved there together only when complete (``qronos_onnx.files.placement``).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qronos_onnx.errors import QronosError
from qronos_onnx.files.placement import staging_dirs

EXTERNAL_THRESHOLD_BYTES = 1024
TOKENIZER_FILE = "tokenizer.json"  # copied beside an output model by ``optimize``


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` with its weights left in their external data files (memory-mapped).

    Raises:
        QronosError: missing, unreadable, truncated or corrupt model, or missing or short
            external data files.
    """
    path = Path(path)
    if not path.is_file():
        raise QronosError(f"model file not found: {path}{_why_missing(path)}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise QronosError(
            f"{path} is not a readable ONNX model (truncated or corrupt?): {err}"
        ) from err
    if not proto.graph.node:
        raise QronosError(
            f"{path} is not a readable ONNX model: its graph has no nodes "
            "(truncated or corrupt file?)"
        )
    _check_external_data(proto, path.parent)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    _map_hard_linked_data(model)
    _name_nodes(model)
    return model


def _why_missing(path: Path) -> str:
    """What a missing model path is instead: a folder, or the output of a run that was killed
    while placing its files (the previous ones wait in its staging folder)."""
    if path.is_dir():
        return " (it is a directory)"
    left = staging_dirs(path)
    if left:
        return (
            f" (a run writing it was killed; what it replaced is in {left[0]}: the next "
            "optimize run on this output puts it back)"
        )
    return ""


def _map_hard_linked_data(model: ir.Model) -> None:
    """Let external tensors whose data file has several hard links (a copy made with ``cp -l``)
    be read. onnx_ir refuses to map such files, a guard against a link to a file outside the
    model's folder; ``_check_external_data`` has checked the locations already, so these
    tensors are mapped by their resolved path instead (no copy is made)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        real = os.path.realpath(tensor.path)
        if os.stat(real).st_nlink > 1:
            value.const_value = ir.ExternalTensor(
                real,
                tensor.offset,
                tensor.length,
                tensor.dtype,
                shape=tensor.shape,
                name=tensor.name,
            )


def _name_nodes(model: ir.Model) -> None:
    """Give unnamed and repeated nodes unique names (``<op_type>_<k>``); ONNX allows both, and
    targets and stages are keyed by node name. Value names are left alone: an empty output
    name marks an optional output that is not computed."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    used = {node.name for node in nodes if node.name}
    seen: set[str] = set()
    for node in nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op_type
        k = 0
        while f"{base}_{k}" in used:
            k += 1
        node.name = f"{base}_{k}"
        used.add(node.name)
        seen.add(node.name)


def _check_external_data(proto: onnx.ModelProto, base: Path) -> None:
    """Every external tensor's file lies in the model's folder (also once symbolic links are
    followed), exists, can be read, and is long enough for its offset and length."""
    sizes: dict[Path, int] = {}
    folder = base.resolve()
    for tensor, location, info in _external_entries(proto, base):
        written = Path(info.get("location", ""))
        if written.is_absolute() or ".." in written.parts:
            raise QronosError(
                f"tensor {tensor.name!r} keeps its data at {str(written)!r}, outside "
                "the model's folder; ONNX external data must be a path inside it "
                "(move the data file beside the model and fix the location)"
            )
        if location not in sizes:
            if not location.is_file():
                raise QronosError(
                    f"external data file {location} (tensor {tensor.name!r}) is "
                    "missing: keep the data file next to the model"
                )
            if not location.resolve().is_relative_to(folder):
                raise QronosError(
                    f"external data file {location} is a symbolic link to "
                    f"{location.resolve()}, outside the model's folder; copy the "
                    "data file beside the model instead"
                )
            if not os.access(location, os.R_OK):
                raise QronosError(
                    f"cannot read the external data file {location}: permission denied"
                )
            sizes[location] = location.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[location]:
            raise QronosError(
                f"external data file {location} is truncated: tensor "
                f"{tensor.name!r} needs {end} bytes, the file has {sizes[location]}"
            )


def _external_entries(proto: onnx.ModelProto, base: Path):
    """``(tensor, data file, external-data fields)`` of every tensor stored outside ``proto``."""
    for tensor in _external_tensors(proto.graph):
        info = {e.key: e.value for e in tensor.external_data}
        yield tensor, base / info.get("location", ""), info


def _external_tensors(graph: onnx.GraphProto):
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attr in node.attribute:
            if attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t
            for sub in [attr.g, *attr.graphs]:
                yield from _external_tensors(sub)


def model_files(path: str | os.PathLike) -> set[Path]:
    """The files a model reads: ``path`` and its external data files (resolved).

    A file that is not a readable model counts as itself alone (``load_model`` says why later).
    """
    path = Path(path)
    files = {path.resolve()}
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return files
    files.update(location.resolve() for _, location, _ in _external_entries(proto, path.parent))
    return files


def data_file_name(output: str | os.PathLike) -> str:
    """The external data file name of a model saved as ``output``: ``<output name>.data``."""
    return Path(output).name + ".data"


def write_model(model: ir.Model, path: Path) -> list[Path]:
    """Write ``model`` to ``path`` and every tensor of 1 KiB or more to ``<path>.data``, in
    place (write into a ``staged_output`` directory to place the files all or nothing).
    Returns the paths written, the model first."""
    data = path.with_name(data_file_name(path))
    ir.save(model, path, external_data=data.name, size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES)
    return [path, data] if data.exists() else [path]
