"""The OpenAI dialect: chat completions, completions, models and tools."""
