"""Errors that end a process with a one-line message instead of a traceback."""


class ConfigError(ValueError):
    """A setting a person or another machine got wrong; the process exits with status 2."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")
