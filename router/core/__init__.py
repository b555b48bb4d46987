"""The decision core: the routing engine, decisions in flight, eligibility, the policy file,
metrics and idempotent routing. No HTTP, no Redis.
"""
