"""Asynchronous jobs: the SQLite store and runner, and the executor that runs a job's body."""
