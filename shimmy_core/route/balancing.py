"""Which upstream takes a request.

The model decides first: only upstreams that are up and list the request's model fit.  Among
those, one of three policies:

- ``cache-aware`` (the default): consistent hashing of the conversation's stable prefix (see
  :func:`prefix_key`) on a ring with virtual nodes, with bounded load (Mirrokni et al., the scheme
  of SGLang's router and llm-d): walking the ring from the key's point, an upstream with no free
  slot whose load is past ``(1 + epsilon)`` times its share of the total (by slots) is skipped for
  the next one.  The same
  conversation keeps landing where its KV cache holds the prefix, unless that upstream is
  overloaded.  A request without a prefix (no messages or prompt) goes to the least loaded.
- ``least-outstanding``: the fewest requests per slot, counting this front's requests in flight
  and the queue the upstream reports in its ``/health``.
- ``round-robin``: each in turn.

An upstream at ``max_outstanding`` requests from this front takes no more; when every fitting
upstream is full the front refuses (503 with ``Retry-After``) instead of queueing.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math

from shimmy_core.route.upstreams import UP, Pool, Upstream

POLICIES = ("cache-aware", "least-outstanding", "round-robin")
VIRTUAL_NODES = 160
PREFIX_CHARS = 2048   # of a completion prompt or a first message: enough to tell conversations apart


class NoUpstream(Exception):
    """No upstream that is up serves the model (``full`` False), or all that do are full."""

    def __init__(self, model: str | None, full: bool):
        super().__init__(model)
        self.model = model
        self.full = full


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def prefix_key(body: dict) -> str | None:
    """The part of a request that stays the same for a whole conversation: the system prompt (or
    instructions) and the first user turn, or the start of a bare prompt; None when there is
    nothing to go on.  Works for every dialect's body (messages, input, prompt, system)."""
    parts = [_text(body.get(name)) for name in ("system", "instructions") if body.get(name)]
    turns = body.get("messages")
    if turns is None and isinstance(body.get("input"), list):
        turns = body["input"]
    if isinstance(turns, list) and turns:
        for turn in turns:
            role = turn.get("role") if isinstance(turn, dict) else None
            parts.append(_text(turn)[:PREFIX_CHARS])
            if role not in ("system", "developer"):
                break       # the first user turn ends the stable prefix
    else:
        prompt = body.get("prompt", body.get("input"))
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            parts.append(prompt[:PREFIX_CHARS])
    if not parts:
        return None
    return "\x1f".join(parts)


def conversation_key(body: dict, model: str | None) -> str | None:
    """The ring key of a request: its model and :func:`prefix_key` (the same conversation with
    another model is another cache)."""
    key = prefix_key(body)
    return f"{model}\x1e{key}" if key is not None else None


class Ring:
    """A consistent-hash ring of the upstreams, ``VIRTUAL_NODES`` points each."""

    def __init__(self, upstreams: list[Upstream], nodes: int = VIRTUAL_NODES):
        points = sorted((_hash(f"{u.url}#{i}"), n) for n, u in enumerate(upstreams) for i in range(nodes))
        self._keys = [p for p, _ in points]
        self._owners = [n for _, n in points]
        self.upstreams = upstreams

    def walk(self, key: str):
        """The upstreams in ring order from ``key``'s point, each once."""
        start = bisect.bisect(self._keys, _hash(key))
        seen: set[int] = set()
        count = len(self._keys)
        for i in range(count):
            owner = self._owners[(start + i) % count]
            if owner not in seen:
                seen.add(owner)
                yield self.upstreams[owner]
                if len(seen) == len(self.upstreams):
                    return


class Balancer:
    def __init__(self, pool: Pool, policy: str = "cache-aware", *, epsilon: float = 0.25, max_outstanding: int = 32):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        self.pool = pool
        self.policy = policy
        self.epsilon = epsilon
        self.max_outstanding = max_outstanding
        self.ring = Ring(pool.upstreams)
        self._turn = itertools.count()

    def weight(self, upstream: Upstream) -> int:
        """Its slots; one that has not loaded the model yet (no slots in its /health) counts as
        many as the others that say."""
        return upstream.slots or max((u.slots for u in self.pool.upstreams), default=0) or 1

    def load(self, upstream: Upstream) -> float:
        """Requests per slot: this front's in flight, plus the queue the upstream reports beyond them."""
        return (upstream.outstanding + max(0, upstream.queued - upstream.outstanding)) / self.weight(upstream)

    def acquire(self, model: str | None, key: str | None, exclude: tuple = (),
                prefer: Upstream | None = None) -> Upstream:
        """Pick an upstream for a request and count it as outstanding there (:meth:`release` after).
        ``prefer``: the one that holds state the request needs (a stored response), if it can take it."""
        with self.pool.lock:
            fitting = [u for u in self.pool.upstreams if u.state == UP and u.serves(model) and u not in exclude]
            room = [u for u in fitting if u.outstanding < self.max_outstanding]
            if not room:
                raise NoUpstream(model, full=bool(fitting))
            chosen = prefer if prefer in room else self._choose(room, key)
            chosen.outstanding += 1
            chosen.requests += 1
            return chosen

    def release(self, upstream: Upstream) -> None:
        with self.pool.lock:
            upstream.outstanding -= 1

    def _choose(self, room: list[Upstream], key: str | None) -> Upstream:
        if self.policy == "round-robin":
            return room[next(self._turn) % len(room)]
        if self.policy == "cache-aware" and key is not None:
            total = sum(u.outstanding for u in room) + 1
            weights = sum(self.weight(u) for u in room)
            for upstream in self.ring.walk(key):
                if upstream in room:
                    weight = self.weight(upstream)
                    bound = math.ceil((1 + self.epsilon) * total * weight / weights)
                    if upstream.outstanding < weight or upstream.outstanding + 1 <= bound:
                        return upstream
        turn = next(self._turn)
        order = room[turn % len(room):] + room[:turn % len(room)]  # ties go round
        return min(order, key=self.load)
