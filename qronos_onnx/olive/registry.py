"""The Olive package-config entry for ``QronosQuantization``, and the merge with Olive's own.

Olive's ``--package-config`` *replaces* its default registry, so a workflow that uses our pass
next to Olive's passes needs both: ``merged_package_config()`` (the ``qronos-onnx olive-config``
command) writes them together. Olive validates algorithms and precisions against its own enums,
which know neither ``qronos`` nor ``gpfq`` nor 2- and 3-bit precisions: the entry declares what
Olive can express (GPTQ-family weight quantization, int4/int8); the pass itself does more.
"""

from __future__ import annotations

import json
from pathlib import Path

PASS_NAME = "QronosQuantization"

REGISTRY = {
    "passes": {
        PASS_NAME: {
            "module_path": "qronos_onnx.olive.QronosQuantization",
            "supported_providers": ["CPUExecutionProvider", "CUDAExecutionProvider"],
            "supported_accelerators": ["cpu", "gpu"],
            "supported_precisions": ["int4", "uint4", "int8", "uint8"],
            "supported_algorithms": ["gptq", "rtn"],
            "supported_quantization_encodings": [],
            "dataset": "dataset_optional",
        }
    },
    "extra_dependencies": {},
}


def merged_package_config() -> dict:
    """Olive's default package config with our pass added."""
    from olive.package_config import OlivePackageConfig

    merged = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    merged["passes"].update(REGISTRY["passes"])
    for name, deps in REGISTRY["extra_dependencies"].items():
        merged.setdefault("extra_dependencies", {})[name] = deps
    return merged
