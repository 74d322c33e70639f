"""dit-export's Python API: `export_model(source, out, ExportOptions(...))`.

Imported lazily, so that `dit-export --help` and `--list` (which import this package) need no torch."""

__all__ = ["ExportOptions", "export_model"]


def __getattr__(name: str):
    if name in __all__:
        from . import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
