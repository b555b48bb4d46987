"""The wire contract: what travels between the router and its clients (request, decision and
outcome messages, errors, redaction) and the Python client. Light: no numpy, no engine; sender
workers import only this.
"""
