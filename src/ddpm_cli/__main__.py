"""`python -m ddpm_cli` and the `ddpm` script: the command line, entered here so that a Ctrl-C
while it loads ends quietly with status 130, as one does later in a command, instead of with a
traceback from inside an import. (The CLI loads in a few tenths of a second; a command imports
torch, which takes seconds on a laptop CPU, when it runs, and a Ctrl-C then is the app's:
cli/common.DdpmGroup.invoke.)"""

import sys


def main() -> None:
    try:
        from ddpm_cli.cli import main as run
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT: the shell's convention, and what a stopped run exits with
    run()


if __name__ == "__main__":
    main()
