"""The one error type that means "the user asked for something we cannot do", raised before heavy work."""

from hydra.errors import CompactHydraException


class ConfigError(CompactHydraException, ValueError):
    """Bad input: names the offending value and the valid choices, in one paragraph.

    A CompactHydraException, so that Hydra ends the job by printing the paragraph alone rather than a traceback (a
    traceback says "the program broke"; this says "the input is wrong"). Hydra prints str(), so the notes added on
    the way out (which MLflow run ended FAILED) are part of it.
    """

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *getattr(self, "__notes__", [])])
