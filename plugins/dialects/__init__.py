"""API dialects: each a package that serves one wire format over the neutral core."""
