"""Function calling, structured output and tools.

- :mod:`~shimmy_core.tools.schemas`: JSON Schema validators that never fetch a remote ``$ref``
  and whose ``pattern`` checks run under a time limit.
- :mod:`~shimmy_core.tools.calls`: tool calls recognised in a model's text, streamed or not.
- :mod:`~shimmy_core.tools.tool_prompts`: tools and tool messages into a chat template, or into the
  messages as text for templates that know no tools.
- :mod:`~shimmy_core.tools.toolbox`: the registered tools, which ones the server may run, and
  running them with validated arguments.
- :mod:`~shimmy_core.tools.loop`: a request's tool plan and the server-side loop.
- :mod:`~shimmy_core.tools.specs`: JSON tool files (``tool-spec.schema.json``).
- :mod:`~shimmy_core.tools.calculator`, :mod:`~shimmy_core.tools.files`,
  :mod:`~shimmy_core.tools.http_client`: the built-in tools' engines (registered by the
  ``tools_*`` plugins).

Nothing here imports an inference library, and nothing here knows how a backend enforces a
format: structured output leaves as an :class:`~shimmy_core.contract.generation.OutputFormat`
(JSON Schema), which each backend compiles (GBNF in ``plugins/backends/gguf/gbnf.py``).
"""
