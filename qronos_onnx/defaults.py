"""Defaults shared by the CLI, the Python API and the Olive pass (a module without heavy
imports, so that ``qronos-onnx --help`` does not load torch or ONNX Runtime)."""

DEFAULT_PRESET = "w4"
DEFAULT_WINDOWS = 32
DEFAULT_EVAL_WINDOWS = 40
DEFAULT_SEQLEN = 512

#: Default report file name beside the output; ``{stem}`` is the output's name without ``.onnx``,
#: so that models written to one directory keep one report each.
DEFAULT_REPORT = "{stem}.report.json"
