"""The sender worker: job queue, job ledger, outcome reporter with its journal and dead letters,
metrics and the `router worker` command.
"""
