"""Discovery sources: where models are found (files and folders, Ollama, Hugging Face, LM Studio)."""
