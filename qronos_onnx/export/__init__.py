"""A local Hugging Face checkpoint as a float ONNX model folder (``checkpoint.py``): GenAI's
model builder (``builder.py``) or ``torch.onnx`` (``torch_export.py``)."""

from .builder import MODEL_FILE, builder_available, run_builder
from .checkpoint import export_checkpoint, exported_checkpoint, is_checkpoint, resolve_model

__all__ = [
    "MODEL_FILE",
    "builder_available",
    "export_checkpoint",
    "exported_checkpoint",
    "is_checkpoint",
    "resolve_model",
    "run_builder",
]
