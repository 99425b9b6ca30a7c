"""Backends: each a package that loads one model format and generates neutral chunks."""
