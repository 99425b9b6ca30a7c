"""``shimmy run MODEL [PROMPT]``: talk to a model in the terminal, as ``ollama run`` does.

By default the model loads in this process and replies come from the core's completion service
(:class:`~shimmy_core.service.CompletionService`), with no port opened; ``--url`` talks to a
running Shimmy (or any OpenAI-compatible server) through ``/v1/chat/completions`` instead.

With a PROMPT, or with text on stdin that is not a terminal, it prints the answer and exits: only
the answer goes to stdout (the load's progress, a thinking model's reasoning and ``--verbose``
figures go to stderr), so it works in pipes.  Otherwise it is an interactive chat: ``>>>``,
multi-line input between ``\"\"\"`` lines, and the commands of :data:`HELP`.  The conversation
lives in this process only; input history too (``readline``, in memory, never written to disk).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

DEFAULT_TEMPERATURE = 0.8   # ollama run's
RUN_ONLY = ("name", "prompt", "temperature", "top_p", "max_tokens", "system", "url", "remote_api_key", "verbose")
HELP = """Commands:
  /set temperature T   sampling temperature (0 to 2)
  /set top_p P         nucleus sampling (0 to 1)
  /set max_tokens N    most tokens per reply (0: no limit but the model's)
  /set                 show these settings
  /system TEXT         set the system message (/system alone shows it)
  /clear               forget the conversation (the system message stays)
  /bye                 leave (Ctrl-D too)
  /?, /help            this help
Begin and end a message of several lines with \"\"\". Ctrl-C stops a reply."""

TEXT, REASONING = "text", "reasoning"


class ChatError(Exception):
    """A reply could not be had (the server refused it, or was not reached); the message says why."""


@dataclass
class Options:
    """How replies are sampled (the flags, then ``/set``)."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    max_tokens: int | None = None

    LIMITS = {"temperature": (0.0, 2.0, float), "top_p": (0.0, 1.0, float), "max_tokens": (0, None, int)}

    def set(self, name: str, text: str) -> str:
        """Set ``name`` from ``text``; a ValueError saying what is wrong otherwise."""
        if name not in self.LIMITS:
            raise ValueError(f"unknown parameter {name!r}: use {', '.join(self.LIMITS)}")
        low, high, kind = self.LIMITS[name]
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{name} takes a{'n integer' if kind is int else ' number'}, not {text!r}") from None
        if value != value or value < low or (high is not None and value > high):
            raise ValueError(f"{name} must be between {low:g} and {high if high is not None else 'any'}")
        setattr(self, name, (value or None) if name == "max_tokens" else value)
        return f"Set {name} to {value}."

    def describe(self) -> str:
        return (f"temperature {self.temperature}, top_p {self.top_p}, "
                f"max_tokens {self.max_tokens if self.max_tokens else 'the model limit'}")


@dataclass
class Reply:
    """What came back: the answer, the reasoning and the counts (None where not told)."""

    text: str = ""
    reasoning: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    first_token: float | None = None   # seconds from the request to the first piece
    stopped: bool = False              # Ctrl-C ended it


# ------------------------------------------------------------------ where replies come from
class LocalChat:
    """The model loaded in this process, through the core's completion service."""

    def __init__(self, service, info):
        self.service = service
        self.info = info

    def stream(self, messages: list[dict], options: Options, usage: Callable[[int, int], None]
               ) -> Iterator[tuple[str, str]]:
        from shimmy_core import streams
        from shimmy_core.contract.generation import BackendError, GenerationRequest, ReasoningDelta, SamplingParams
        from shimmy_core.contract.generation import TextDelta, Usage
        from shimmy_core.parsed_request import ParsedRequest

        params = SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p)
        request = GenerationRequest(messages=tuple(messages), params=params)
        parsed = ParsedRequest(kind="chat", model=self.info.id, prompts=(request,), n=1, stream=True,
                               include_usage=True, echo=False)
        try:
            run = self.service.start(parsed, info=self.info)
        except BackendError as exc:
            raise ChatError(str(exc)) from None
        try:
            for _, chunk in run.events():
                if isinstance(chunk, TextDelta) and chunk.text:
                    yield TEXT, chunk.text
                elif isinstance(chunk, ReasoningDelta) and chunk.text:
                    yield REASONING, chunk.text
                elif isinstance(chunk, Usage):
                    usage(chunk.prompt_tokens, chunk.completion_tokens)
        except BackendError as exc:
            raise ChatError(str(exc)) from None
        finally:
            streams.close(run.chunks)


class RemoteChat:
    """A running server's ``/v1/chat/completions``, streamed (Server-Sent Events)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 300.0):
        from urllib.parse import urlsplit

        base = url.rstrip("/")
        self.base = base[:-3] if base.endswith("/v1") else base
        if urlsplit(self.base).scheme not in ("http", "https") or not urlsplit(self.base).netloc:
            raise ChatError(f"--url {url}: not an http:// or https:// URL (e.g. http://127.0.0.1:11435)")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout

    def stream(self, messages: list[dict], options: Options, usage: Callable[[int, int], None]
               ) -> Iterator[tuple[str, str]]:
        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "temperature": options.temperature, "top_p": options.top_p}
        if options.max_tokens:
            body["max_tokens"] = options.max_tokens
        response = self._open("/v1/chat/completions", body)
        try:
            for data in _sse_data(response):
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ChatError(f"{self.base} sent an event that is not JSON: {data[:200]!r}") from None
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    raise ChatError(_error_message(event))
                counts = event.get("usage")
                if isinstance(counts, dict):
                    usage(counts.get("prompt_tokens"), counts.get("completion_tokens"))
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    for key, kind in (("reasoning_content", REASONING), ("reasoning", REASONING), ("content", TEXT)):
                        if isinstance(delta.get(key), str) and delta[key]:
                            yield kind, delta[key]
        except OSError as exc:
            raise ChatError(f"the connection to {self.base} broke: {exc}") from None
        finally:
            response.close()

    def _open(self, path: str, body: dict):
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers=headers,
                                             method="POST")
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            detail = exc.read(64 * 1024).decode("utf-8", "replace")
            try:
                message = _error_message(json.loads(detail))
            except ValueError:
                message = detail.strip()[:300] or exc.reason
            raise ChatError(f"{self.base} answered {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            raise ChatError(f"cannot reach {self.base}: {getattr(exc, 'reason', exc)}") from None
        except (ValueError, OSError) as exc:  # a malformed URL, a refused or reset connection
            raise ChatError(f"cannot reach {self.base}: {exc}") from None


def _sse_data(response) -> Iterator[str]:
    """The ``data:`` payloads of an event stream (several ``data:`` lines of one event joined)."""
    lines: list[str] = []
    for raw in response:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        elif not line and lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _error_message(doc) -> str:
    """The message of an error body or event (OpenAI's ``{"error": {"message": ...}}`` and kin)."""
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


# ------------------------------------------------------------------ showing a reply
class Screen:
    """Where a reply goes: the answer to ``out``, the reasoning dimmed to ``err``."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out = out
        self.err = err
        self.dim = _isatty(err)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def _faint(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.dim else text

    def reply(self, pieces: Iterator[tuple[str, str]], reply: Reply) -> Reply:
        """Show ``pieces`` as they come; Ctrl-C stops them (``reply.stopped``)."""
        started = time.monotonic()
        thinking = False
        try:
            for kind, text in pieces:
                if reply.first_token is None:
                    reply.first_token = time.monotonic() - started
                if kind == REASONING:
                    if not thinking:
                        thinking = True
                        self.err.write(self._faint("Thinking...\n"))
                    reply.reasoning += text
                    self.err.write(self._faint(text))
                    self.err.flush()
                    continue
                if thinking:
                    thinking = False
                    self.err.write(self._faint("\n...done thinking.\n\n"))
                    self.err.flush()
                if not reply.text:
                    text = text.lstrip("\n")
                reply.text += text
                self.out.write(text)
                self.out.flush()
        except KeyboardInterrupt:
            reply.stopped = True
        finally:
            _close(pieces)
            reply.seconds = time.monotonic() - started
        if thinking:
            self.err.write(self._faint("\n"))
        if not reply.text.endswith("\n"):
            self.out.write("\n")
        self.out.flush()
        if reply.stopped:
            self.note("(reply stopped)")
        return reply

    def figures(self, reply: Reply) -> None:
        """``--verbose``: the counts and speed of a reply."""
        made = reply.completion_tokens
        rate = f", {made / reply.seconds:.1f} tokens/s" if made and reply.seconds > 0 else ""
        first = f"; first token after {reply.first_token:.2f} s" if reply.first_token is not None else ""
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else "?"
        self.note(self._faint(f"{prompt} prompt tokens; {made if made is not None else '?'} tokens in "
                              f"{reply.seconds:.2f} s{rate}{first}"))


def _close(stream) -> None:
    closer = getattr(stream, "close", None)
    if closer is not None:
        closer()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


# ------------------------------------------------------------------ a conversation
@dataclass
class Conversation:
    chat: LocalChat | RemoteChat
    screen: Screen
    options: Options = field(default_factory=Options)
    system: str | None = None
    turns: list[dict] = field(default_factory=list)
    verbose: bool = False

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def ask(self, text: str) -> Reply:
        """Send ``text``; the reply is shown as it comes and kept for the next turns.  A stopped
        reply is kept as far as it went (dropped with its question when nothing came)."""
        self.turns.append({"role": "user", "content": text})
        reply = Reply()

        def usage(prompt_tokens, completion_tokens) -> None:
            reply.prompt_tokens, reply.completion_tokens = prompt_tokens, completion_tokens

        try:
            self.screen.reply(self.chat.stream(self.messages(), self.options, usage), reply)
        except ChatError:
            self.turns.pop()
            raise
        if reply.text:
            self.turns.append({"role": "assistant", "content": reply.text})
        else:
            self.turns.pop()
        if self.verbose and reply.completion_tokens is not None:  # a stopped reply has no counts
            self.screen.figures(reply)
        return reply

    def command(self, line: str) -> bool:
        """Run a ``/`` command; False when it is ``/bye``."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        note = self.screen.note
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/?", "/help"):
            note(HELP)
        elif name == "/clear":
            self.turns.clear()
            note("Cleared the conversation.")
        elif name == "/system":
            if rest:
                self.system = rest
                note("Set the system message.")
            else:
                note(f"System message: {self.system!r}" if self.system else "No system message.")
        elif name == "/set":
            parts = rest.split()
            if not parts:
                note(self.options.describe())
            elif len(parts) != 2:
                note("Use /set NAME VALUE, e.g. /set temperature 0.2")
            else:
                try:
                    note(self.options.set(parts[0].replace("-", "_"), parts[1]))
                except ValueError as exc:
                    note(str(exc))
        else:
            note(f"Unknown command {name!r}. Type /? for help.")
        return True


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, or the lines between an opening and a closing ``\"\"\"``."""
    line = read(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""'):
        return first.rstrip()[:-3]
    lines = [first] if first else []
    while True:
        line = read("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def interactive(conversation: Conversation, read: Callable[[str], str] = input) -> int:
    try:
        import readline  # noqa: F401  (line editing and an in-memory history for input())
    except ImportError:  # pragma: no cover - Windows without pyreadline
        pass
    conversation.screen.note("Type a message; /? for help, /bye or Ctrl-D to leave.")
    while True:
        try:
            text = read_message(read)
        except EOFError:
            conversation.screen.out.write("\n")
            return 0
        except KeyboardInterrupt:
            conversation.screen.note("\nUse Ctrl-D or /bye to exit.")
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            if not conversation.command(text):
                return 0
            continue
        try:
            conversation.ask(text)
        except ChatError as exc:
            conversation.screen.note(f"shimmy run: {exc}")


# ------------------------------------------------------------------ the command
def _local_chat(args: argparse.Namespace, make_settings: Callable[[argparse.Namespace], object], screen: Screen):
    """``(shimmy, LocalChat)`` with the model loaded; a ChatError when it cannot be."""
    from shimmy_core.app import build
    from shimmy_core.contract.generation import BackendError
    from shimmy_core.service import CompletionService

    flags = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    path = os.path.expanduser(args.name)
    is_path = os.path.exists(path)  # a model file or folder, like serve --model; else a name from shimmy list
    if is_path:
        flags["models"] = [*(flags.get("models") or []), path]
    if flags.get("parallel") is None:
        flags["parallel"] = 1  # one conversation: one slot with the whole context
    settings = make_settings(argparse.Namespace(**flags))
    shimmy = build(settings)
    for failure in shimmy.pm.report.failed:
        screen.note(f"shimmy: plugin {failure.name!r} failed to load: {failure.error}")
    try:
        if is_path:
            real = os.path.realpath(path)
            info = next((m for m in shimmy.catalog.list() if os.path.realpath(m.path) == real), None)
            if info is None:
                raise ChatError(f"{args.name} is not a model Shimmy can serve; 'shimmy list --all --model "
                                f"{args.name}' says why")
        else:
            info = shimmy.catalog.lookup(args.name)
            if info is None and os.sep in args.name:
                raise ChatError(f"{args.name}: no such file, and no model of that name")
            if info is None:
                raise ChatError(shimmy.catalog.not_found(args.name))
        service = CompletionService(shimmy.catalog, shimmy.manager, settings, shimmy.tools)
        try:
            service.resolve(info.id)
            service.manager.get(info)  # load now (the progress bar), not at the first message
        except BackendError as exc:
            raise ChatError(str(exc)) from None
    except BaseException:
        shimmy.close()
        raise
    return shimmy, LocalChat(service, info)


def run(args: argparse.Namespace, make_settings: Callable[[argparse.Namespace], object],
        stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``shimmy run``; ``make_settings`` turns the flags into :class:`Settings` (the CLI's)."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    screen = Screen(out, err)
    prompt = args.prompt
    one_shot = prompt is not None or not _isatty(stdin)
    if not _isatty(stdin):
        piped = stdin.read()
        prompt = "\n\n".join(part for part in (prompt, piped.strip("\n")) if part)
        if not prompt:
            screen.note("shimmy run: no prompt: give one as an argument or on stdin")
            return 2
    options = Options(temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
                      top_p=1.0 if args.top_p is None else args.top_p, max_tokens=args.max_tokens or None)
    shimmy = None
    try:
        if args.url:
            key = args.remote_api_key or os.environ.get("SHIMMY_API_KEY", "").split(",")[0].strip() or None
            chat: LocalChat | RemoteChat = RemoteChat(args.url, args.name, key)
        else:
            shimmy, chat = _local_chat(args, make_settings, screen)
        conversation = Conversation(chat, screen, options, args.system, verbose=args.verbose)
        if not one_shot:
            return interactive(conversation)
        reply = conversation.ask(prompt)
        return 130 if reply.stopped else 0
    except ChatError as exc:
        screen.note(f"shimmy run: {exc}")
        return 1
    except KeyboardInterrupt:
        screen.note("")
        return 130
    except BrokenPipeError:  # the reader of a pipe left: nothing more to say (and no error at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    finally:
        if shimmy is not None:
            shimmy.close()
