"""`python -m chatloop.cli`: the `chatloop` command."""

from chatloop.cli import main

main()
