"""Monitoring: the service's prediction log against the watched model's training data (drift,
PSI, data quality, live or estimated performance, the service's own figures) and the decision
they lead to. A library of pure functions on pandas frames: the monitor flow
(``flows/monitor.py``) reads the files, loads the model, records the results and emits the
retraining event; nothing here writes or emits."""
