"""Shimmy: a local, private, OpenAI-compatible LLM server.

Importing this package is cheap on purpose: no plugin is loaded, no model is
read, and neither torch, transformers nor llama_cpp is imported.
"""

__version__ = "0.1.0"
