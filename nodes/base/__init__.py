"""Base models: the tiny random Llama that tests build, loading a base directory, and
resolving a tree spec's ``base.model`` (``tiny``, ``smollm2``, a GGUF file, a local dir) to one.

Import from the modules: :mod:`nodes.base.model` (make, load, digest) and
:mod:`nodes.base.resolve` (spec -> directory + digest).
"""

__all__: list[str] = []
