"""The HTTP layer: Falcon resources, middleware (request id, limits, CORS, auth, draining) and the
waitress server."""
