"""Errors a user can act on, each with its own process exit code.

Anything raised as a `UserError` is printed by the CLI as one line (no traceback)
and the process exits with the error's `exit_code`.
"""


class UserError(Exception):
    """A problem with what the user gave us (config, data, flags, files)."""

    exit_code = 2


class ConfigError(UserError):
    """A run or node config file has an unknown key or a value out of range."""

    exit_code = 3


class DataError(UserError):
    """The data directory is missing, empty or unreadable."""

    exit_code = 4


class CheckpointError(UserError):
    """No usable checkpoint (all candidates corrupt, or a schema mismatch)."""

    exit_code = 5


class SwarmError(UserError):
    """The swarm cannot be joined: unreachable peers, mismatched run, bad records."""

    exit_code = 6


class DHTProcessExited(SwarmError):
    """This node's DHT process is gone (killed, out of memory): the node cannot reach the
    swarm any more and stops; its last checkpoint stays, and a restart rejoins."""
