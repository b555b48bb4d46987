"""Replicas on one Redis: shared learned state, the event bus and its outbox, the cluster identity
and the leased global throughput caps.
"""
