"""``shimmy run`` end to end with the real SmolLM2 GGUF: one-shot answers for pipes (a PROMPT,
stdin, both), the interactive chat driven through a pseudo-terminal (prompt, streamed replies,
``/set``, ``/system``, ``/clear``, ``\"\"\"`` blocks, Ctrl-C, ``/bye``), ``--url`` against a real
``shimmy serve`` and against nothing, an unknown model; and the load progress display
(:mod:`shimmy_core.progress`) with a fake clock, then fed by real llama.cpp loads."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MODEL_ID, server_env

STATS = re.compile(r"(\d+) prompt tokens; (\d+) tokens in [\d.]+ s")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run-home")


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """The run's environment.  A load shows its line only after SHIMMY_PROGRESS_AFTER seconds:
    60 here unless a test sets it, so that what a test reads on stderr does not depend on how
    fast this machine loads the model just then (a CI run once took 1.2 s, over the default 1)."""
    return server_env(home, **{"SHIMMY_PROGRESS_AFTER": "60", **extra})


def shimmy_run(args: list[str], env: dict[str, str], stdin: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shimmy_core", "run", *args], env=env, text=True,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)


def stats(stderr: str) -> tuple[int, int]:
    found = STATS.findall(stderr)
    assert found, f"no --verbose figures in:\n{stderr}"
    prompt, made = found[-1]
    return int(prompt), int(made)


# ------------------------------------------------------------------ one-shot
def test_one_shot_prompt_prints_only_the_answer(home, smollm2_path):
    result = shimmy_run([str(smollm2_path), "What is 2+2?", "--temperature", "0", "--max-tokens", "24",
                         "--verbose"], env_for(home, SHIMMY_PROGRESS_AFTER="0"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), result.stderr
    assert result.stdout.endswith("\n") and "shimmy" not in result.stdout and "tokens in" not in result.stdout
    # The load's progress, fed by llama.cpp, as one line on a stderr that is not a terminal.
    assert re.search(rf"^shimmy: loading {re.escape(MODEL_ID)} \([\d.]+ MB\) \.\.\. done in [\d.]+ s$",
                     result.stderr, re.M), result.stderr
    prompt, made = stats(result.stderr)
    assert prompt > 5 and 0 < made <= 24


def test_one_shot_reads_stdin_after_the_prompt(home, smollm2_path):
    text = "The cat sat on the mat. It was a sunny day and the cat was happy.\n"
    alone = shimmy_run([MODEL_ID, "--model", str(smollm2_path), "--max-tokens", "16", "--verbose"],
                       env_for(home), stdin=text)
    both = shimmy_run([MODEL_ID, "Summarize in five words:", "--model", str(smollm2_path), "--max-tokens", "16",
                       "--verbose"], env_for(home), stdin=text)
    for result in (alone, both):
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() and "shimmy" not in result.stdout
        assert "loading" not in result.stderr  # a load under the threshold shows nothing
    assert stats(both.stderr)[0] > stats(alone.stderr)[0]  # the PROMPT came with the piped text


def test_reasoning_goes_to_stderr(home, thinking_model):
    """A thinking model's reasoning is shown apart, on stderr: stdout keeps the answer alone."""
    result = shimmy_run([str(thinking_model), "What is 2+2?", "--temperature", "0", "--max-tokens", "24"],
                        env_for(home))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("Thinking...\n") and len(result.stderr) > len("Thinking...\n") + 5
    assert "<think>" not in result.stdout and "Thinking" not in result.stdout


def test_an_unknown_model_is_one_clear_line(home, smollm2_path):
    result = shimmy_run(["smollm3", "hi", "--model", str(smollm2_path), "--no-demo"], env_for(home))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "shimmy run: no model named 'smollm3'; 'shimmy list' shows the names"
    missing = shimmy_run([str(home / "nope.gguf"), "hi"], env_for(home))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "no such file" in missing.stderr


# ------------------------------------------------------------------ --url
def test_url_talks_to_a_running_server(home, start_server, smollm2_path):
    server = start_server(["--model", str(smollm2_path), "--no-demo"], SHIMMY_PROGRESS_AFTER="0")
    result = shimmy_run([MODEL_ID, "What is the capital of France?", "--url", server.url, "--temperature", "0",
                         "--max-tokens", "16", "--verbose"], env_for(home))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "loading" not in result.stderr  # nothing loaded here
    prompt, made = stats(result.stderr)
    assert prompt > 5 and 0 < made <= 16

    refused = shimmy_run(["no-such-model", "hi", "--url", server.base], env_for(home))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (f"shimmy run: {server.base} answered 404: The model 'no-such-model' does not "
                                      "exist. GET /v1/models lists the models this server has.")
    server.stop()
    # serve loaded the model at the first request and said so in one log line (its stderr is a pipe).
    log = "".join(server.lines)
    assert re.search(rf"^shimmy: loading {re.escape(MODEL_ID)} .* \.\.\. done in [\d.]+ s$", log, re.M), log


def test_a_bad_url_is_one_clear_line(home):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for url, says in ((f"http://127.0.0.1:{port}", f"cannot reach http://127.0.0.1:{port}: "),
                      ("localhost:11435", "--url localhost:11435: not an http:// or https:// URL")):
        result = shimmy_run(["any", "hi", "--url", url], env_for(home), timeout=30)
        assert result.returncode == 1, result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"shimmy run: {says}")


# ------------------------------------------------------------------ interactive, through a pseudo-terminal
class Terminal:
    """A command on a pseudo-terminal (its controlling terminal: Ctrl-C sends SIGINT)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        pid, fd = pty.fork()
        if pid == 0:  # the child
            try:
                # A terminal's program starts with Ctrl-C's default meaning: a harness run in the
                # background (`cmd &` in a script) hands its children SIGINT ignored, and Python
                # then installs no KeyboardInterrupt handler (every Ctrl-C would be lost).
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(sys.executable, [sys.executable, "-m", "shimmy_core", *args], env)
            finally:
                os._exit(127)
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.pid, self.fd = pid, fd
        self.raw = ""        # everything the terminal showed, escapes and all
        self.seen = 0        # how far expect() has read (in the text without escapes)
        self.status: int | None = None

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw).replace("\r", "")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child is gone
            data = b""
        if not data:
            return False
        self.raw += data.decode("utf-8", "replace")
        return True

    def expect(self, pattern: str, timeout: float = 60) -> str:
        """The text from where the last expect() stopped up to the first match of ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.text, self.seen)
            if found:
                chunk = self.text[self.seen:found.end()]
                self.seen = found.end()
                return chunk
            if time.monotonic() > deadline or not self._read(min(0.2, max(0.0, deadline - time.monotonic()))):
                raise AssertionError(f"{pattern!r} did not show; the terminal showed:\n{self.text[self.seen:]}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self._read(0.1)
        raise AssertionError(f"still running; the terminal showed:\n{self.text}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


PROMPT = r"(?m)^>>> $"


def ask(term: Terminal, text: str) -> tuple[str, int, int]:
    """Send a message; (what showed until the next prompt, prompt tokens, tokens made)."""
    term.line(text)
    shown = term.expect(PROMPT + r"|>>> \Z", timeout=60)
    found = STATS.findall(shown)
    assert len(found) == 1, f"one reply expected:\n{shown}"
    return shown, int(found[0][0]), int(found[0][1])


def test_interactive_chat_through_a_terminal(home, smollm2_path):
    term = Terminal(["run", str(smollm2_path), "--verbose"], env_for(home, TERM="xterm", SHIMMY_PROGRESS_AFTER="0"))
    try:
        # The load's bar (a terminal: redrawn in place, then the one line), then the prompt.
        opening = term.expect(r">>> ")
        assert re.search(r"\[[#.]{30}\] +\d+%", term.raw), term.raw
        assert re.search(rf"shimmy: loading {re.escape(MODEL_ID)} .*\.\.\. done in [\d.]+ s", opening), opening
        assert "/? for help" in opening

        term.line("/set temperature 0")
        assert "Set temperature to 0.0." in term.expect(r">>> ")
        term.line("/set max_tokens 24")
        assert "Set max_tokens to 24." in term.expect(r">>> ")

        shown, first_prompt, first_made = ask(term, "What is the capital of France?")
        reply = shown.split("What is the capital of France?", 1)[1].split("prompt tokens")[0]
        assert re.search(r"\w", reply), shown                       # a streamed reply
        _, second_prompt, _ = ask(term, "And of Germany?")
        assert second_prompt > first_prompt + first_made            # the conversation was kept

        term.line("/clear")
        assert "Cleared the conversation." in term.expect(r">>> ")
        _, cleared_prompt, _ = ask(term, "And of Germany?")
        assert cleared_prompt < second_prompt

        term.line("/system You are a pirate who answers every question about geography in exactly one word.")
        assert "Set the system message." in term.expect(r">>> ")
        term.line("/clear")
        term.expect(r">>> ")
        _, system_prompt, _ = ask(term, "And of Germany?")
        assert system_prompt != cleared_prompt                      # SmolLM2's default system message replaced

        # A block of several lines is one message: one reply.
        term.line('"""')
        term.expect(r"\.\.\. ")
        term.line("First line of the question,")
        term.line("second line of the question.")
        _, block_prompt, _ = ask(term, '"""')
        assert block_prompt > system_prompt

        # Ctrl-C stops a reply, not the program.  The one-word pirate goes first (he answered
        # every long request in under 10 tokens, before a Ctrl-C could reach him); should the
        # model still end an answer before the Ctrl-C arrives, another request is tried.
        term.line("/system You are a helpful assistant who writes long, detailed answers.")
        term.expect(r">>> ")
        term.line("/clear")
        term.expect(r">>> ")
        term.line("/set max_tokens 2000")
        term.expect(r">>> ")
        for request in ("Count from 1 to 1000, one number per line.",
                        "Write a very long story about a dragon who learns to cook.",
                        "List every country of the world with its capital city."):
            term.line(request)
            term.expect(re.escape(request[-6:]) + r"\n.*\w", timeout=30)    # the reply began
            term.send("\x03")
            stopped = term.expect(r">>> ", timeout=60)
            if "(reply stopped)" in stopped:
                break
        assert "(reply stopped)" in stopped, stopped
        term.line("/set max_tokens 8")
        term.expect(r">>> ")
        _, _, made = ask(term, "Thanks!")                           # the model is free again
        assert made > 0

        term.line("/nonsense")
        assert "Unknown command '/nonsense'" in term.expect(r">>> ")
        term.line("/bye")
        assert term.wait() == 0
    finally:
        term.close()


def test_ctrl_d_leaves(home, smollm2_path):
    term = Terminal(["run", str(smollm2_path)], env_for(home, TERM="dumb"))
    try:
        term.expect(r">>> ")
        term.send("\x04")
        assert term.wait() == 0
    finally:
        term.close()


# ------------------------------------------------------------------ the progress display
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_shows_nothing_for_a_quick_load_and_one_line_off_a_terminal():
    from shimmy_core.progress import LoadProgress

    clock, out = Clock(), io.StringIO()
    with LoadProgress("quick", stream=out, tty=False, after=1.0, clock=clock, redraw=False) as progress:
        progress(0.5)
        clock.now += 0.9
    assert out.getvalue() == ""

    with LoadProgress("slow (2 GB)", stream=out, tty=False, after=1.0, clock=clock, redraw=False) as progress:
        progress(0.5)
        progress.draw()          # off a terminal: no bar, ever
        clock.now += 2.5
    assert out.getvalue() == "shimmy: loading slow (2 GB) ... done in 2.5 s\n"

    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with LoadProgress("broken", stream=out, tty=False, after=1.0, clock=clock, redraw=False):
            clock.now += 3
            raise RuntimeError("no")
    assert out.getvalue() == "shimmy: loading broken ... failed after 3.0 s\n"


def test_progress_bar_on_a_terminal():
    from shimmy_core.progress import LoadProgress

    clock, out = Clock(), io.StringIO()
    with LoadProgress("big", stream=out, tty=True, after=1.0, clock=clock, redraw=False) as progress:
        clock.now += 0.5
        progress(0.2)
        progress.draw()
        assert out.getvalue() == ""          # not before a second
        clock.now += 1.0
        progress(0.5)
        progress(0.3)                        # progress never goes back
        progress(float("nan"))
        progress.draw()
        assert out.getvalue() == "\rshimmy: loading big [" + "#" * 15 + "." * 15 + "]  50%  1.5 s\x1b[K"
        progress(7)
        clock.now += 0.5
        progress.draw()
        assert out.getvalue().endswith("[" + "#" * 30 + "] 100%  2.0 s\x1b[K")
    assert out.getvalue().endswith("\r\x1b[Kshimmy: loading big ... done in 2.0 s\n")


def test_the_bar_shows_while_the_library_silences_stderr():
    """llama.cpp points the stream's descriptor at /dev/null while the weights load (its
    ``suppress_stdout_stderr``): the bar drawn meanwhile still reaches the terminal."""
    from shimmy_core.progress import LoadProgress

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    clock = Clock()
    try:
        with LoadProgress("big", stream=stream, tty=True, after=0, clock=clock, redraw=False) as progress:
            saved = os.dup(write_end)
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), write_end)
            try:
                clock.now += 0.5
                progress(0.4)
                progress.draw()
            finally:
                os.dup2(saved, write_end)
                os.close(saved)
        stream.close()
        shown = b""
        while chunk := os.read(read_end, 65536):
            shown += chunk
    finally:
        os.close(read_end)
    assert shown.decode() == ("\rshimmy: loading big [" + "#" * 12 + "." * 18 + "]  40%  0.5 s\x1b[K"
                              "\r\x1b[Kshimmy: loading big ... done in 0.5 s\n")


def test_the_manager_passes_progress_only_to_a_load_that_takes_it():
    from shimmy_core.catalog import _load

    calls = []

    class Old:
        def load(self, model, settings):
            calls.append(("old", model))
            return "old model"

    class New:
        def load(self, model, settings, plan=None, progress=None):
            progress(0.5)
            calls.append(("new", plan))
            return "new model"

    assert _load(Old(), "m", None, None, calls.append) == "old model"
    assert _load(New(), "m", None, "a plan", calls.append) == "new model"
    assert calls == [("old", "m"), 0.5, ("new", "a plan")]


def test_lines_others_write_during_a_bar_stay_whole(monkeypatch):
    """On a terminal the bar owns its line: another writer's line clears it first, and the bar is
    not drawn again until that line is finished (print writes the text, then the newline)."""
    from shimmy_core.progress import LoadProgress

    clock, out = Clock(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    log = logging.getLogger("shimmy.test-progress")
    handler = logging.StreamHandler(out)                 # as serve's log: bound to stderr at start
    log.addHandler(handler)
    try:
        with LoadProgress("big", tty=True, after=0.0, clock=clock, redraw=False) as progress:
            assert sys.stderr is not out                 # a stand-in, while the bar is up
            progress.draw()
            sys.stderr.write("shimmy: a note")
            progress.draw()                              # not in the middle of the note
            sys.stderr.write("\n")
            clock.now += 1
            progress.draw()
            log.warning("GET /health 200")
            progress.draw()
    finally:
        log.removeHandler(handler)
    assert sys.stderr is out and handler.stream is out
    bar = "shimmy: loading big [" + "." * 30 + "]   0%"
    assert out.getvalue() == (f"\r{bar}  0.0 s\x1b[K" "\r\x1b[Kshimmy: a note\n" f"\r{bar}  1.0 s\x1b[K"
                              "\r\x1b[KGET /health 200\n" f"\r{bar}  1.0 s\x1b[K"
                              "\r\x1b[Kshimmy: loading big ... done in 1.0 s\n")
