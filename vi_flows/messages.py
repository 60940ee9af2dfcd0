"""Errors in one line, for tables, warnings and the command line."""


def first_line(failure):
    """``"TypeName: first line of the message"`` of an exception."""
    message = str(failure).strip()
    return f"{type(failure).__name__}: {message.splitlines()[0]}" if message else type(failure).__name__
