"""``python -m edgemole`` is the ``edgemole`` command."""

from edgemole.cli import main

if __name__ == "__main__":
    main()
