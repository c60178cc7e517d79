"""``python -m snap2caption`` is the same as the ``snap2caption`` command."""

from snap2caption.cli import main

main()
