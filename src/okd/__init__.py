"""okd: knowledge distillation for autoregressive language models, with Online Knowledge Distillation."""

__version__ = "0.1.0"


def installed_version() -> str:
    """The installed package's version (its metadata), else ``__version__`` (a source tree run in place)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("okd")
    except PackageNotFoundError:
        return __version__
