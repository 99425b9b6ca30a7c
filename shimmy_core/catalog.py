"""The models being served: the catalog that names what the discovery sources found
(:class:`~shimmy_core.contract.model_info.ModelInfo`), and the manager that loads each one
once and shares it."""

from __future__ import annotations

import collections
import functools
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from shimmy_core.contract.embedding import WrongModelKind
from shimmy_core.contract.generation import (
    BackendUnavailable,
    InsufficientMemory,
    InvalidPrompt,
    LoadedModel,
    ModelNotFound,
    Overloaded,
)
from shimmy_core.contract.memory import Device, PlacementRequest, Plan
from shimmy_core.contract.model_info import DEFAULT_PRIORITY, DiscoverySource, ModelInfo, SkippedFile
from shimmy_core.contract.settings import SettingsError
from shimmy_core import devices as device_probe, memory_planner, streams
from shimmy_core.formatting import human_size
from shimmy_core.progress import LoadProgress

if TYPE_CHECKING:  # pragma: no cover
    from shimmy_core.lifecycle import Lifecycle
    from shimmy_core.plugin_manager import ShimmyPluginManager
    from shimmy_core.plugin_registry import Registry
    from shimmy_core.contract.settings import Settings




@dataclass(frozen=True)
class _Snapshot:
    models: dict[str, ModelInfo]
    aliases: dict[str, str]
    folded: dict[str, str]
    skipped: list[SkippedFile]
    notes: list[str]
    counts: dict[str, int]
    scanned_at: float
    seconds: float


_EMPTY = _Snapshot({}, {}, {}, [], [], {}, float("-inf"), 0.0)


class ModelCatalog:
    """Every model the registered sources find, under unique, stable ids.

    Sources are asked in priority order (``--model`` files, ``shimmy add``, model folders,
    Ollama, Hugging Face, LM Studio, the demo model).  The same model file found twice is
    listed once, its other names kept as aliases.  Two different models with the same
    name: the first keeps it, the other is listed as ``source:name``; every model also
    answers to ``source:name``, and :meth:`notes` says what happened.  Discovery results
    are cached; :meth:`refresh` rescans (cheap: headers are cached by the sources), and
    :meth:`list`/:meth:`get` rescan at most every ``refresh_interval`` seconds, so a running
    server sees models added or removed.
    """

    def __init__(self, sources: Iterable[DiscoverySource], refresh_interval: float = 2.0,
                 aliases: Mapping[str, str] | None = None):
        self._sources = sorted(sources, key=lambda s: getattr(s, "priority", DEFAULT_PRIORITY))
        self._aliases = dict(aliases or {})    # --model-alias: requested name -> model name ("*": any other)
        self._folded_aliases = {k.casefold(): v for k, v in self._aliases.items()}
        self._refresh_lock = threading.Lock()
        self._snap = _EMPTY
        self._refresh_interval = refresh_interval

    @property
    def sources(self) -> list[DiscoverySource]:
        return list(self._sources)

    def refresh(self) -> None:
        """Rescan every source now (one scan at a time: sources keep caches)."""
        with self._refresh_lock:
            self._scan()

    def _scan(self) -> None:
        started = time.monotonic()
        found: list[ModelInfo] = []
        skipped: list[SkippedFile] = []
        counts: dict[str, int] = {}
        for source in self._sources:
            try:
                result = source.discover()
            except Exception as exc:  # a broken source must not hide the others
                skipped.append(SkippedFile("", f"source failed: {type(exc).__name__}: {exc}", source.name,
                                           category="source-failed"))
                continue
            counts[source.name] = len(result.models)
            skipped.extend(result.skipped)
            found.extend(result.models)
        if any(not info.extra.get("fallback") for info in found):
            # A fallback (the demo model) is served only when nothing else is found.
            found = [info for info in found if not info.extra.get("fallback")]
        models, aliases, notes = _name(found)
        folded: dict[str, str] = {}
        for name, target in [*((k, k) for k in models), *aliases.items()]:
            key = name.casefold()
            folded[key] = target if folded.get(key, target) == target else ""
        self._snap = _Snapshot(models, aliases, {k: v for k, v in folded.items() if v}, skipped, notes,
                               counts, time.monotonic(), time.monotonic() - started)

    def _fresh(self) -> _Snapshot:
        """The current snapshot, rescanned first when older than the interval.  While one thread
        rescans, the others go on with the previous snapshot instead of waiting for it."""
        snap = self._snap
        if time.monotonic() - snap.scanned_at > self._refresh_interval:
            first = snap is _EMPTY
            if self._refresh_lock.acquire(blocking=first):
                try:
                    if time.monotonic() - self._snap.scanned_at > self._refresh_interval:
                        self._scan()
                finally:
                    self._refresh_lock.release()
        return self._snap

    def list(self) -> list[ModelInfo]:
        return list(self._fresh().models.values())

    def skipped(self) -> list[SkippedFile]:
        return list(self._fresh().skipped)

    def notes(self) -> list[str]:
        """Name clashes and duplicates resolved by the last scan, in words."""
        return list(self._fresh().notes)

    def counts(self) -> dict[str, int]:
        """Models each source found in the last scan (before duplicates were merged)."""
        return dict(self._fresh().counts)

    def scan_seconds(self) -> float:
        return self._fresh().seconds

    def resolve(self, model_id: str, kind: str) -> ModelInfo:
        """The model a request naming ``model_id`` gets (see :meth:`lookup`: ids, file names,
        ``--model-alias``), if it is a ``kind`` model; else ``ModelNotFound`` or ``WrongModelKind``
        (a chat model asked for embeddings...)."""
        info = self.lookup(model_id)
        if info is None:
            raise ModelNotFound(model_id)
        if info.kind != kind:
            raise WrongModelKind(info.id, info.kind, kind)
        return info

    def get(self, model_id: str) -> ModelInfo | None:
        """Find a model by id, alias (file name, with or without ``.gguf``; ``source:id``), or either
        spelled in another case when that is unambiguous.  A path is just an unknown name."""
        snap = self._fresh()
        if model_id in snap.models:
            return snap.models[model_id]
        target = snap.aliases.get(model_id) or snap.folded.get(model_id.casefold())
        return snap.models.get(target) if target else None

    def lookup(self, name: str) -> ModelInfo | None:
        """The model a request naming ``name`` gets: the model of that name (:meth:`get`), else the
        model an operator's ``--model-alias`` maps it to (``NAME=MODEL``, the name in any case),
        else the model of the ``*`` alias.  An alias never hides a model the catalog has; the
        listing (:meth:`list`) shows models, not aliases."""
        info = self.get(name)
        if info is not None or not self._aliases:
            return info
        target = self._aliases.get(name) or self._folded_aliases.get(name.casefold()) or self._aliases.get("*")
        return self.get(target) if target else None

    def not_found(self, name: str) -> str:
        """Why ``name`` gets no model, in words, with the names closest to it."""
        import difflib

        close = difflib.get_close_matches(name, [m.id for m in self.list()], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; 'shimmy list' shows the names"
        return f"no model named {name!r}{hint}"

    def alias_notes(self) -> list[str]:
        """Aliases whose model is not found now (their names get a 404 until it appears)."""
        return [f"--model-alias {name}={target}: no model {target!r} is found now"
                for name, target in self._aliases.items() if self.get(target) is None]


def _identity(info: ModelInfo) -> tuple[str, Any]:
    """Two finds are the same model when they load the same file the same way.

    Sources may pass the resolved path as ``extra["real_path"]`` (computed once, cached).
    """
    path = info.extra.get("real_path")
    if not isinstance(path, str):
        try:
            path = os.path.realpath(info.path)
        except (OSError, ValueError):
            path = info.path
    return path, info.extra.get("variant")


def _name(found: list[ModelInfo]) -> tuple[dict[str, ModelInfo], dict[str, str], list[str]]:
    """Unique ids, aliases and notes for ``found`` (already in priority order)."""
    by_identity: dict[tuple[str, Any], int] = {}
    unique: list[ModelInfo] = []
    more_names: list[list[str]] = []
    notes: list[str] = []
    for info in found:
        key = _identity(info)
        if key in by_identity:
            index = by_identity[key]
            first = unique[index]
            more_names[index] += [info.id, f"{info.source}:{info.id}", *info.aliases]
            if info.source != first.source:
                notes.append(f"{info.source} also has {first.id!r} ({info.path}) as {info.id!r}: listed once, "
                             f"both names work")
            continue
        by_identity[key] = len(unique)
        unique.append(info)
        more_names.append([f"{info.source}:{info.id}"])

    models: dict[str, ModelInfo] = {}
    for info in unique:
        if info.id in models:
            other = models[info.id]
            qualified, n = f"{info.source}:{info.id}", 2
            while qualified in models:
                qualified, n = f"{info.source}:{info.id}~{n}", n + 1
            notes.append(f"{info.id!r} names two models: {other.source} {other.path} keeps it, "
                         f"{info.source} {info.path} is listed as {qualified!r}")
            info = replace(info, id=qualified)
        models[info.id] = info

    aliases: dict[str, str] = {}
    # Source-qualified names first, then other names of merged duplicates, then file names.
    for group in (lambda i: more_names[i][:1], lambda i: more_names[i][1:], lambda i: unique[i].aliases):
        for index, model_id in enumerate(models):
            for alias in group(index):
                if alias not in models:
                    aliases.setdefault(alias, model_id)
    return models, aliases, notes


def _load(backend, info: ModelInfo, settings: "Settings", plan: Plan | None, progress: Callable[[float], None]):
    """``backend.load``, given the plan and the progress callback when it takes them (a backend
    written before either takes neither)."""
    import inspect

    kwargs: dict[str, Any] = {} if plan is None else {"plan": plan}
    try:
        parameters = inspect.signature(backend.load).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "progress" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        kwargs["progress"] = progress
    return backend.load(info, settings, **kwargs)


def _limit(entry: "_Entry", default: float) -> float:
    """Seconds ``entry`` may stay unused: a request's keep-alive, else the server's."""
    return default if entry.keep_alive is None else entry.keep_alive


class _Entry:
    """One loaded model and who holds it."""

    __slots__ = ("info", "model", "leases", "last_used", "plan", "keep_alive")

    def __init__(self, info: ModelInfo, model: LoadedModel, plan: Plan | None = None):
        self.info = info
        self.model = model
        self.leases = 0                  # requests holding the model right now
        self.last_used = time.monotonic()
        self.plan = plan                 # where the planner put it (None: a backend without memory facts)
        self.keep_alive: float | None = None  # a request's keep-alive for this model (None: --keep-alive)

    def bytes_on(self, device: str) -> int:
        """What this model holds on ``device``: its plan's figures, else its file size in CPU memory."""
        if self.plan is not None:
            return self.plan.use(device).total
        return self.info.size_bytes if device == "cpu" else 0


class _Lease:
    """What :meth:`ModelManager.get` hands out: the loaded model, kept in memory while this
    object lives (a request holds it from resolution to its last chunk).  Everything is the
    model's, except that ``prepare`` enforces ``max_prompt_tokens``, ``generate_choices``
    refuses requests still waiting for a slot when the server drains, and ``close`` is the
    manager's business."""

    def __init__(self, manager: "ModelManager", entry: _Entry):
        self._manager = manager
        self._entry = entry
        self._model = entry.model
        weakref.finalize(self, manager._release, entry)

    def __getattr__(self, name: str) -> Any:
        if name in ("_manager", "_entry", "_model"):
            raise AttributeError(name)
        value = getattr(self._model, name)
        if name == "generate_choices":
            return functools.partial(self._manager._generate_choices, value)
        return value

    def prepare(self, request):
        prepared = self._model.prepare(request)
        limit = self._manager._settings.max_prompt_tokens
        if limit > 0 and len(prepared.tokens) > limit:
            param = "messages" if request.messages is not None else "prompt"
            raise InvalidPrompt(
                f"The {param} is {len(prepared.tokens)} tokens long; this server accepts at most {limit} "
                "prompt tokens (SHIMMY_MAX_PROMPT_TOKENS).",
                param=param, code="prompt_too_long",
            )
        return prepared

    def close(self) -> None:
        """Nothing: the manager unloads models."""

    def __repr__(self) -> str:
        return f"<lease of {self._model!r}>"


class ModelManager:
    """Loads each model once, on first use, with the backend a decision hook picks.

    ``get`` returns a lease (see :class:`_Lease`); a model is never unloaded while a lease on
    it lives.  With ``max_loaded_models`` the least recently used idle model is unloaded to
    make room for another (a 503 when every loaded model is busy); with ``keep_alive`` a
    model unused that many seconds is unloaded by a background thread (0: at once).

    Before a load, the memory planner places the model on the devices' free memory (when its
    backend says what the model needs: ``memory_facts``); when it does not fit, the least
    recently used idle models are unloaded until it does.  Loads are planned and made one at a
    time, so that two never count the same free memory.  A model that would fit only
    without a busy one gets a 503 to retry; one that cannot fit at all gets
    :class:`InsufficientMemory` with the numbers, before anything is allocated.
    ``devices`` (for tests) replaces the detection of the devices and their free memory.

    A load shows its progress on stderr (:mod:`shimmy_core.progress`): ``progress`` makes the
    display of one load from its description (default :class:`~shimmy_core.progress.LoadProgress`);
    a backend whose ``load`` takes a ``progress`` argument feeds it.
    """

    def __init__(self, pm: "ShimmyPluginManager", registry: "Registry", settings: "Settings",
                 lifecycle: "Lifecycle | None" = None, devices: Callable[[], list[Device]] | None = None,
                 progress: Callable[[str], Any] | None = None):
        self._pm = pm
        self._registry = registry
        self._settings = settings
        self._lifecycle = lifecycle
        self._devices = devices or (lambda: device_probe.detect(settings.max_memory))
        self._progress = progress or LoadProgress
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._locks: dict[str, threading.Lock] = {}   # one per model path: load and unload in turn
        # One plan-and-load at a time (across models): a plan reads the devices' free memory, which
        # a load still in progress has not taken yet, so two loads must never plan side by side.
        self._placing = threading.Lock()
        # Re-entrant: a lease's finalizer may run inside this thread's own critical section (GC).
        self._guard = threading.RLock()
        self._loading = 0
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    def backend_for(self, info: ModelInfo):
        name = self._pm.hook.shimmy_backend_for_model(model=info, backends=dict(self._registry.backends))
        if name is None or name not in self._registry.backends:
            raise BackendUnavailable(f"no backend can serve {info.format} models (model {info.id!r})")
        return self._registry.backends[name]

    def unavailable_reason(self, info: ModelInfo) -> str | None:
        """Why ``info`` cannot be served here (no backend, or its extra is missing), else None."""
        try:
            return self.backend_for(info).unavailable_reason()
        except BackendUnavailable as exc:
            return str(exc)

    def get(self, info: ModelInfo) -> LoadedModel:
        key = info.path
        with self._guard:
            entry = self._entries.get(key)
            if entry is not None:
                return self._lease(key, entry)
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                entry = self._entries.get(key)
                if entry is not None:
                    return self._lease(key, entry)
                victims = self._make_room()
                self._loading += 1
            try:
                for victim in victims:
                    self._unload(victim, "to make room (--max-loaded-models)")
                backend = self.backend_for(info)
                reason = backend.unavailable_reason()
                if reason:
                    raise BackendUnavailable(reason)
                settings = self.settings_for(info)
                with self._placing:
                    plan = self.plan(info, backend, settings, evict=True)
                    size = f" ({human_size(info.size_bytes)})" if info.size_bytes else ""
                    with self._progress(f"{info.id}{size}") as progress:
                        loaded = _load(backend, info, settings, plan, progress)
            finally:
                with self._guard:
                    self._loading -= 1
            with self._guard:
                entry = _Entry(info, loaded, plan)
                self._entries[key] = entry
                lease = self._lease(key, entry)
        self._start_reaper()
        return lease

    # ------------------------------------------------------------ memory
    def settings_for(self, info: ModelInfo) -> "Settings":
        """The server's settings with the model's own options (``shimmy add --ctx-size ...``)."""
        try:
            return self._settings.with_options(info.extra.get("model_settings"))
        except SettingsError as exc:
            raise BackendUnavailable(f"model {info.id!r}: {exc}") from None

    def placement_request(self, settings: "Settings") -> PlacementRequest:
        margin = device_probe.parse_size(settings.memory_margin) if settings.memory_margin else -1
        return PlacementRequest(slots=max(1, settings.parallel), ctx_per_slot=settings.ctx_size,
                                max_ctx=settings.max_ctx, gpu_layers=settings.gpu_layers,
                                moe_offload=settings.moe_offload, margin=margin)

    def plan(self, info: ModelInfo, backend=None, settings: "Settings | None" = None, *,
             evict: bool = False) -> Plan | None:
        """Where ``info`` would go now (None: its backend cannot say what it needs).  With
        ``evict``, idle models are unloaded, least recently used first, until it fits;
        :class:`InsufficientMemory` (or Overloaded, when only busy models are in the way) when
        it cannot."""
        backend = backend or self.backend_for(info)
        facts_of = getattr(backend, "memory_facts", None)
        if facts_of is None:
            return None
        settings = settings or self.settings_for(info)
        facts = facts_of(info, settings)
        request = self.placement_request(settings)
        devices = self._devices()
        plan = memory_planner.plan(info.id, facts, devices, request)
        if plan.fits or not evict:
            return plan
        with self._guard:
            loaded = sorted(((e.leases > 0, e.last_used, k) for k, e in self._entries.items()), key=lambda t: t[:2])
        freed: list[str] = []
        for busy, _, key in loaded:
            freed.append(key)
            with self._guard:
                entries = [self._entries[k] for k in freed if k in self._entries]
            more = [Device(d.name, d.total, d.free + sum(e.bytes_on(d.name) for e in entries), d.label)
                    for d in devices]
            plan = memory_planner.plan(info.id, facts, more, request)
            if not plan.fits:
                continue
            if busy:
                raise Overloaded(f"{info.id!r} fits in memory only once busy models finish "
                                 f"({', '.join(e.info.id for e in entries)}). Retry shortly.", retry_after=5.0)
            with self._guard:
                victims = [(k, self._entries.pop(k)) for k in freed
                           if k in self._entries and self._entries[k].leases == 0]
            for victim in victims:
                self._unload(victim, f"to make room in memory for {info.id}")
            return plan
        raise InsufficientMemory(
            f"{info.id!r} does not fit in memory, not even with one slot of {memory_planner.MIN_SLOT_CTX} tokens "
            f"and every idle model unloaded. With {plan.slots} slot(s) of {plan.ctx_per_slot} tokens, "
            f"{memory_planner.shortfall(plan, devices, request.margin)}. Try a smaller quantization, "
            "--ctx-size, --parallel, or --max-memory/--memory-margin if the free memory is misjudged.",
            plan=plan)

    # ------------------------------------------------------------ leases
    def _lease(self, key: str, entry: _Entry) -> _Lease:
        entry.leases += 1
        entry.last_used = time.monotonic()
        self._entries.move_to_end(key)
        return _Lease(self, entry)

    def _release(self, entry: _Entry) -> None:
        # A finalizer: keep it small, and leave the unloading to the reaper thread.
        with self._guard:
            entry.leases -= 1
            entry.last_used = time.monotonic()
        if entry.leases == 0 and 0 in (self._settings.keep_alive, entry.keep_alive):
            self._wake.set()

    def keep_alive(self, info: ModelInfo, seconds: float) -> bool:
        """How long ``info`` stays loaded once unused, from now on (a request's keep-alive, as
        Ollama's ``keep_alive``; negative: until evicted).  0 unloads it at once when it is idle,
        else as soon as its last request ends.  False when it is not loaded."""
        with self._guard:
            entry = self._entries.get(info.path)
            if entry is None:
                return False
            entry.keep_alive = seconds
            idle_now = seconds == 0 and entry.leases == 0
            if idle_now:
                del self._entries[info.path]
        if idle_now:
            self._unload((info.path, entry), "on request (keep-alive 0)")
        elif seconds >= 0:
            self._start_reaper(force=True)
            self._wake.set()
        return True

    def _generate_choices(self, generate: Callable, choices, cancelled: Callable[[], bool]):
        """``generate_choices`` of a lease: while the request waits for a slot, a drain cancels it
        and it gets a 503 (``ShuttingDown``); once admitted it may run through the grace period."""
        lifecycle = self._lifecycle
        if lifecycle is None:
            return generate(choices, cancelled)
        from shimmy_core.lifecycle import ShuttingDown

        if lifecycle.draining:
            raise ShuttingDown()
        waiting = True

        def cancelled_or_draining() -> bool:
            return cancelled() or (waiting and lifecycle.draining)

        chunks = generate(choices, cancelled_or_draining)
        waiting = False
        if lifecycle.draining:  # cancelled in the queue (or admitted the moment the drain began)
            streams.close(chunks)
            raise ShuttingDown()
        return chunks

    # ------------------------------------------------------------ unloading
    def _make_room(self) -> list[tuple[str, _Entry]]:
        """With the guard held: take out of the table the idle models that must go so that one more
        fits under ``max_loaded_models``; Overloaded when every loaded model is busy."""
        limit = self._settings.max_loaded_models
        if limit <= 0:
            return []
        victims = []
        while len(self._entries) + self._loading >= limit:
            idle = [(e.last_used, k) for k, e in self._entries.items() if e.leases == 0]
            if not idle:
                for key, entry in victims:  # nothing unloaded after all
                    self._entries[key] = entry
                raise Overloaded(
                    f"{len(self._entries)} models are loaded (--max-loaded-models {limit}) and all are in use. "
                    "Retry shortly.", retry_after=1.0,
                )
            _, key = min(idle)
            victims.append((key, self._entries.pop(key)))
        return victims

    def _unload(self, victim: tuple[str, _Entry], why: str) -> None:
        key, entry = victim
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        acquired = lock.acquire(blocking=False) or lock.acquire(timeout=60)
        try:
            entry.model.close()
        finally:
            if acquired:
                lock.release()
        print(f"shimmy: unloaded {entry.info.id} {why}", file=sys.stderr, flush=True)

    def _start_reaper(self, force: bool = False) -> None:
        if (self._settings.keep_alive < 0 and not force) or self._reaper is not None or self._closed.is_set():
            return
        with self._guard:
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap_forever, name="shimmy-keep-alive", daemon=True)
                self._reaper.start()

    def _reap_forever(self) -> None:
        keep_alive = self._settings.keep_alive
        interval = 1.0 if keep_alive <= 0 else min(max(keep_alive / 4, 0.05), 5.0)
        while not self._closed.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            now = time.monotonic()
            with self._guard:
                expired = [(k, e) for k, e in self._entries.items()
                           if e.leases == 0 and 0 <= _limit(e, keep_alive) <= now - e.last_used]
                for key, _ in expired:
                    del self._entries[key]
            for victim in expired:
                limit = _limit(victim[1], keep_alive)
                self._unload(victim, f"after {limit:g} s unused ({'--keep-alive' if victim[1].keep_alive is None else 'its keep-alive'})")

    # ------------------------------------------------------------ reporting
    def loaded_paths(self) -> list[str]:
        with self._guard:
            return list(self._entries)

    def stats(self) -> list[dict]:
        """What each loaded model is doing (``busy_slots``, ``queued``... where the backend says)."""
        with self._guard:
            entries = list(self._entries.items())
        return [
            {"id": entry.info.id, "path": path, **(entry.model.stats() if hasattr(entry.model, "stats") else {}),
             **({"placement": _placement(entry.plan)} if entry.plan is not None else {})}
            for path, entry in entries
        ]

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        with self._guard:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            entry.model.close()


def _placement(plan: Plan) -> dict:
    """What ``/health`` shows of where a model is."""
    return {
        "slots": plan.slots, "ctx_per_slot": plan.ctx_per_slot, "gpu_layers": plan.gpu_layers,
        "layers": plan.n_layers, "experts": plan.n_experts, "cpu_expert_layers": plan.cpu_expert_layers,
        "devices": {u.device: {"bytes": u.total, "weights": u.weights, "kv_cache": u.kv, "compute": u.compute,
                               "layers": u.layers} for u in plan.uses},
        "given_up": list(plan.given_up),
    }
