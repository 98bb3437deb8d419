"""Errors shown to the operator: one clear line that names the file, key or value at fault."""


class RtnfError(Exception):
    """Base class for every error rtnf reports to the user (the CLI prints it as one line)."""


class ConfigError(RtnfError):
    """A configuration file or override is invalid (message names the key path and value)."""


class SessionFormatError(RtnfError):
    """A session file is malformed or does not hold what rtnf needs (message names file and key)."""


class BundleError(RtnfError):
    """A calibration bundle is missing, malformed, modified or truncated (names bundle and file)."""


class EngineError(RtnfError):
    """An inference backend cannot be used or built here (message names backend and cause)."""
