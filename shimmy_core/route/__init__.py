"""``shimmy route`` and ``shimmy serve --instances``: a front that spreads requests over several
Shimmy (or OpenAI-compatible) servers.

- :mod:`.upstreams`: each upstream's state (models, health, load, ejection with backoff) and the
  thread that polls them;
- :mod:`.balancing`: which upstream takes a request (cache-aware consistent hashing with bounded
  load, least outstanding, round-robin) and the conversation prefix the hash is made from;
- :mod:`.proxy`: the Falcon app that forwards requests and streams answers through unbuffered;
- :mod:`.front`: the command: settings, waitress, graceful drain, local worker processes.

See docs/deployment.md.
"""
