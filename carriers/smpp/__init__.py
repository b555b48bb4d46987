"""The SMPP protocol side: the smpplib connection, message encoding, delivery receipts, their
matching and their time.
"""
