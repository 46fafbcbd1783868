"""Exceptions shared by the fast-path twins, so either twin's errors are caught alike."""


class FramingError(Exception):
    """A message length that cannot be right: the stream is unusable from here on."""
