"""Exceptions. Every error names the cause and the fix; a failed transform leaves the model untouched."""


class SparsifyError(Exception):
    """Base class of all sparsify_fx errors."""


class TraceError(SparsifyError):
    """The model could not be traced to an FX graph (names the failing op or source line)."""


class AnalysisError(SparsifyError):
    """The coupling analysis could not run on a graph."""


class ConfigError(SparsifyError, ValueError):
    """A config value is out of range or does not fit the model."""


class AdapterError(SparsifyError):
    """An adapter does not fit the base model, or its file is corrupt."""


class KernelError(SparsifyError):
    """A kernel-backed op breaks the contract of the reference op it stands in for (schema, output shapes/dtypes)."""


class SparsifyWarning(UserWarning):
    """Base class of all sparsify_fx warnings: ``warnings.filterwarnings("error", category=SparsifyWarning)``
    turns every "did something other than asked" into an error."""
