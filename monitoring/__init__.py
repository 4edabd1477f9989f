"""Monitoring: the service's prediction log against the watched model's training data (drift,
PSI, data quality, live or estimated performance, the service's own figures). A library: the
monitor flow (flows/monitor.py) reads, decides and records; nothing here writes or emits."""
