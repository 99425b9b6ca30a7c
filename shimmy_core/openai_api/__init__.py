"""Everything about the OpenAI wire format lives here: request validation,
response and chunk builders, the error envelope and the SSE writer."""
