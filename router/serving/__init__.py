"""A running router: the service that wires the engine to its log, tracking and replicas, and the
multi-process server.
"""
