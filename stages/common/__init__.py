"""Helpers shared by every stage: config, errors, atomic I/O, CLI glue, tracking."""
