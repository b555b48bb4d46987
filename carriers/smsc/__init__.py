"""The simulated SMSC (an SMPP server for the demo, tests and benchmarks): sessions, receipts and
its event clock.
"""
