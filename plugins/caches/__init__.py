"""Response caches: in memory and on disk."""
