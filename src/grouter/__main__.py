"""``grouter`` and ``python -m grouter``: the command line, clean from the first moment.

Loading the commands takes seconds (PyTorch, scikit-learn); a Ctrl-C in that time is reported
like any other interruption, in one line, instead of a traceback from inside an import.
"""

import sys


def main() -> int:
    try:
        from .cli import main as run  # imported here, inside the guard: the slow part of start-up
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
