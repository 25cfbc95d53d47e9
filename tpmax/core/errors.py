"""tpmax's exception types (the bottom of the package: everything may raise these)."""


class LoadError(ValueError):
    """A model that cannot be loaded; the message names the file and the problem."""


class ConfigError(LoadError):
    """A model configuration tpmax cannot run."""


class WeightError(LoadError):
    """Weights that do not match their config: missing, extra, misshapen, or non-finite."""


class ChatTemplateError(LoadError):
    """A chat template that cannot be compiled or rendered: a syntax error, a refused operation,
    a limit on time or output size, or the template's own `raise_exception`; the message names
    the template's source and the reason."""
