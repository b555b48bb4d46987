"""Offline work on the decision log: off-policy evaluation, its MLflow runs, and the finance cost
report.
"""
