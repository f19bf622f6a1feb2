"""What every command in analysis/ shares: an argparse parser whose errors are one line, and main()
run as a command (bad input one line on stderr, no traceback; a reader that leaves early, as
`| head` does, stops it quietly). The commands import it by name: `python analysis/TOOL.py` puts
this folder first on sys.path."""

import argparse
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit status 2, like the commands'
    other bad input."""

    def __init__(self, **kwargs):
        # no abbreviations: an old --out must not be taken for --out-dir
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(2)


def run_command(main, argv, bad_input: type, status: int) -> int:
    """main(argv) as a command: its exit status; a `bad_input` exception is printed as one line,
    `error: ...`, and gives `status`; a closed stdout gives 1 and nothing on stderr."""
    try:
        code = main(argv)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except bad_input as error:
        print(f"error: {error}", file=sys.stderr)
        return status
    except BrokenPipeError:  # the reader left early (`| head`): stop quietly, as a Unix tool does
        # stdout to /dev/null, so that the interpreter's own flush at exit finds no pipe to fail on
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
