"""`make bench`: the service measured next to the floors of the stack it runs on (docs/BENCHMARKS.md).

One module per measurement (throughput, storm, exec_rate, memory, sweep, cancel); `bench.run` runs
them and writes the report. Every run uses its own database and its own Redis queue on the shared
servers and starts real gunicorn and Celery processes.
"""
