"""The one error type that means "the user asked for something we cannot do", raised before heavy work."""


class ConfigError(ValueError):
    """Bad input: names the offending value and the valid choices, in one paragraph."""
