"""The one exception type users see: a problem with their input, stated with its fix."""


class GrouterError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` (one line) and exits 2.

    Raise it for anything the user can fix (bad path, wrong vocabulary, k > E, corrupt file);
    let programming errors propagate as ordinary exceptions.
    """


def one_line(error: GrouterError) -> str:
    """The error's own message, also when a DataLoader worker raised it: PyTorch re-raises it in the main
    process with the worker's traceback prepended, whose last line is ``grouter.errors.GrouterError: <message>``."""
    text = str(error).strip()
    if "\n" not in text:
        return text
    return text.splitlines()[-1].split(f"{GrouterError.__name__}: ", 1)[-1]
