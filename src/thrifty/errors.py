"""The one exception type users see for problems they can fix themselves."""


class ThriftyError(Exception):
    """Bad input, a missing or corrupt file, an unsupported model.

    The message always says what was wrong, where (file, line or field) and
    what to do about it, so the CLI can print it without a traceback.
    """
