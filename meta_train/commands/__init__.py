"""Subcommands of the ``hyperadam`` CLI; each module exposes ``register(parser)``."""
