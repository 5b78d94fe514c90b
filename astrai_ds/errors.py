"""Errors for a user's expected mistakes: the CLI prints their message alone, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or value and what to do."""


class ConfigError(UserError):
    """A config file or override is wrong."""


class DataError(UserError):
    """A data file, shard folder or tokenizer is missing, damaged or does not match."""


class RequestError(UserError):
    """A generation request is invalid; the message names the field."""


class ContextTooLong(RequestError):
    """A prompt does not fit the model's context (the server's 400 says `context_length_exceeded`, as OpenAI's)."""
