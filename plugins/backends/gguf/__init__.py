"""GGUF models through llama.cpp: the backend plugin (``gguf_backend``) and the continuous-batching
engine it drives (``gguf_engine``)."""
