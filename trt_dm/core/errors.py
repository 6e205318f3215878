"""Errors about the inputs a caller gave, typed with the setting they concern, so that each front end (the
command line, the HTTP service) words them in its own names without parsing another front end's text."""
from __future__ import annotations


class InputError(ValueError):
    """A refused input value, naming the setting it is about.

    ``field``: the setting's request / JSON field ("class_labels", "guidance_scale", "steps", "prompt"; the
    setting's own name where no request field carries it). ``flag``: its command-line flag ("--class-labels"), or
    None. ``str(e)`` is the message the command line prints (it may name flags); ``request_message`` is the same
    message worded with request field names, what the HTTP service answers (``str(e)`` when that names no flag).
    """

    def __init__(self, message: str, *, field: str, flag: str | None = None,
                 request_message: str | None = None) -> None:
        super().__init__(message)
        self.field, self.flag = field, flag
        self.request_message = message if request_message is None else request_message

    def __reduce__(self):  # keyword-only arguments: pickle (Ray, multiprocessing) through a rebuild function
        return _rebuild, (type(self), str(self), self.field, self.flag, self.request_message)


def _rebuild(cls: type[InputError], message: str, field: str, flag: str | None,
             request_message: str) -> InputError:
    return cls(message, field=field, flag=flag, request_message=request_message)
