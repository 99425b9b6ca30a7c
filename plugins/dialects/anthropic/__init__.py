"""The Anthropic dialect: the Messages API (``/v1/messages`` and its token count)."""
