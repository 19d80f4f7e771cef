"""``python -m mssar_cli`` (what ``torchrun -m mssar_cli`` runs) is the ``mssar`` command."""

from mssar_cli.cli import main

main()
