"""Output formats: each a ``base.Format`` in a module of its own, registered by name in
``qronos_onnx.registry.FORMATS``."""
