"""The ``okd`` command (``python -m okd``, and the ``okd`` script installed with the package).

``okd --version`` is answered here, without loading torch; everything else goes to ``okd.cli``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--version"]:
        from okd import installed_version

        print(f"okd {installed_version()}")
        return
    from okd.cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
