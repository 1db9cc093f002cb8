"""``python -m hourglass``: the same command as the ``hourglass`` console script."""

from hourglass.cli import main

main()
