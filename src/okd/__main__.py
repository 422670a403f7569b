"""``python -m okd``: the ``okd`` command."""

from okd.cli import main

if __name__ == "__main__":
    main()
