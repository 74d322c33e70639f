"""The project's exceptions. Each message names the bad value, the rule, and the way out."""


class DitError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class ConfigError(DitError, ValueError):
    """A model configuration or built-in model name is not valid."""


class LoaderError(DitError):
    """Weights could not be loaded (missing/unexpected keys, shapes, unsafe format)."""


class ManifestError(DitError):
    """An engine folder is missing, incomplete, tampered with or from an unknown schema version."""


class BackendUnavailable(DitError):
    """A backend cannot start here (missing package, no GPU, graph it cannot run)."""


class InputError(DitError, ValueError):
    """A generation request has a bad value (steps, guidance, class label, size, output path...)."""
