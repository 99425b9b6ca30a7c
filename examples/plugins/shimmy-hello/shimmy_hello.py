"""A minimal Shimmy plugin: registers one tool, ``hello``, that greets someone."""

from shimmy_core.plugin_api import hookimpl


class HelloTool:
    name = "hello"
    description = "Greet someone by name."
    parameters = {
        "type": "object",
        "properties": {"name": {"type": "string", "description": "who to greet"}},
        "required": ["name"],
        "additionalProperties": False,
    }

    def run(self, arguments: dict) -> str:
        return f"Hello, {arguments['name']}!"


@hookimpl
def shimmy_register_tools(register):
    register(HelloTool())
