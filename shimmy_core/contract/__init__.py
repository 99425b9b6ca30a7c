"""The contract between Shimmy's core and its plugins: the hook specifications and the types
they exchange (model descriptions, neutral generation requests and chunks, settings, errors).

This package imports nothing else from Shimmy (an import-linter contract in pyproject.toml
keeps it so).  Plugins do not import it directly: :mod:`shimmy_core.plugin_api` re-exports
everything a plugin may use.
"""
