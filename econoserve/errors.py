"""Errors that are the user's to fix: the CLI prints them on one line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a record, a name, a flag).

    The message is a single line that names what is wrong and where (file, record), so the
    CLI can print it without a traceback.
    """

    exit_status = 2


class TraceError(UserError):
    """A trace file or table that violates the trace schema."""


class DataError(UserError):
    """A dataset that is unknown, unavailable, or fails its checksum."""


class PredictorError(UserError):
    """A response-length model that is missing, corrupt or incompatible, or input it cannot use."""
