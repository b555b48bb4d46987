"""What the `router` subcommands run beyond serving: the demo, the console output helpers and the
key management commands.
"""
