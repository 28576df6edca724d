"""Load and save ONNX models with external data, without ever touching the input files.

Loading keeps weights in the external data files, memory-mapped by ``onnx_ir``. Saving writes
every tensor of 1 KiB or more to one data file beside the model (``<output>.data``), so the
protobuf never nears its 2 GB limit. Outputs are written into a temporary directory next to the
final place and moved there together only when complete (``qronos_onnx.staging``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qronos_onnx.errors import QronosError

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
        raise QronosError(
            f"model file not found: {path}" + (" (it is a directory)" if path.is_dir() else "")
        )
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


def check_output_path(
    output: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    force: bool,
    companions: Sequence[str] = (),
) -> Path:
    """Check where ``output`` will be written, before any work.

    What gets written is ``output``, its data file ``<output>.data`` and the ``companions``
    (file names beside ``output``, e.g. the report). None of them may be a file an input model
    reads (its ``.onnx`` or external data), even with ``force``; an existing one is only
    replaced with ``force``. ``<output>.lock`` is the run's lock (``qronos_onnx.staging``).
    """
    output = Path(output)
    if output.suffix != ".onnx":
        raise QronosError(f"output must end in .onnx, got {output}")
    limit = _name_max(output.parent)
    # the longest name made from the output's is its staging directory, 14 bytes longer
    if len(os.fsencode(output.name)) + 14 > limit:
        raise QronosError(
            f"the output name {output.name!r} is too long: this file system "
            f"allows {limit} bytes per name, and the files written beside it "
            f"need {limit - 14} at most"
        )
    for name in companions:
        if len(os.fsencode(name)) > limit:
            raise QronosError(
                f"the file name {name!r} is longer than the {limit} bytes this "
                "file system allows; choose a shorter name"
            )
    if output.is_dir():
        raise QronosError(f"{output} is a directory; give the output model's file name")
    _check_writable_dir(output.parent)
    written = [output, output.with_name(data_file_name(output))]
    for name in companions:
        if Path(name).name != name or name in ("", ".", ".."):
            raise QronosError(f"{name!r} is not a plain file name for beside the output")
        if name.endswith(".onnx") or name == TOKENIZER_FILE or name == f"{output.name}.lock":
            raise QronosError(
                f"{name!r} cannot name a file beside the output: *.onnx names "
                f"models, {TOKENIZER_FILE} the tokenizer copied there and "
                f"{output.name}.lock the run's lock"
            )
        if output.with_name(name) in written:
            raise QronosError(f"{name!r} is the output model's own file name")
        written.append(output.with_name(name))
    for path in written:
        if path.is_dir():
            raise QronosError(f"{path} is a directory; it would be replaced by a file")
    for source in inputs:
        read = model_files(source)
        inodes = {_inode(p) for p in read} - {None}
        for path in written:
            if path.resolve() in read or _inode(path) in inodes:
                link = "" if path.resolve() in read else " through a hard link"
                raise QronosError(
                    f"refusing to overwrite {path}: the input model {source} reads "
                    f"it{link}; choose another output"
                )
    existing = [path for path in written if path.exists()]
    if existing and not force:
        raise QronosError(f"{existing[0]} exists; give force to overwrite it")
    return output


def _inode(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing file (hard links share it), else ``None``."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of ``directory`` (or its nearest existing
    ancestor) allows; 255 where it cannot be asked."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _check_writable_dir(directory: Path) -> None:
    """``directory`` exists and is writable, or can be created (its nearest existing ancestor
    is a writable directory)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise QronosError(f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QronosError(f"cannot write into {existing}: permission denied")


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
