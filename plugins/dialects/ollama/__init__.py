"""The Ollama API dialect (``/api/...``)."""
