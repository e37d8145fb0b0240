"""`python -m ddpm_cli` runs the command line, as the `ddpm` script does."""

from ddpm_cli.cli import main

if __name__ == "__main__":
    main()
