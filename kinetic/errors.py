"""Exceptions shared by the library and the ``kinetic`` command.

A leaf module: it imports nothing from kinetic, so any layer can use these without pulling in the
command-line package.
"""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""
