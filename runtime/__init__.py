"""ditrt.runtime: load an engine folder written by dit-export and generate images. Needs no torch."""

from .errors import BackendUnavailable, ConfigError, DitError, InputError, LoaderError, ManifestError
from .manifest import SCHEMA_VERSION, Manifest, load_manifest
from .pipeline import Pipeline, Result

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "DitError",
    "InputError",
    "LoaderError",
    "Manifest",
    "ManifestError",
    "Pipeline",
    "Result",
    "SCHEMA_VERSION",
    "load_manifest",
]
