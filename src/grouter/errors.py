"""The one exception type users see: a problem with their input, stated with its fix."""


class GrouterError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` (one line) and exits 2.

    Raise it for anything the user can fix (bad path, wrong vocabulary, k > E, corrupt file);
    let programming errors propagate as ordinary exceptions.
    """
