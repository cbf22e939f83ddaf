"""Errors about a library function's arguments, worded in the function's argument names; the command line rewords
them in its flags (cli.py), so the library never speaks in flags and the CLI never parses messages.

A message is a ``str.format`` template whose fields are keyword values given with it:

- ``{data}``: the argument and its value, ``data='coco/'`` (the command line: ``--data coco/``);
- ``{data:name}``: the argument's name alone, ``data`` (``--data``);
- ``{what:value}``: the value alone, for anything that is not an argument (a file's description, a count).

    raise argument_error(FileNotFoundError, "{data}: not 'synthetic' and not a folder", data=data)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class _Field:
    """One keyword value of a message, formatted as an argument (``name=value`` or ``--flag value``), its name, or its
    value alone."""

    def __init__(self, name: str, value, flag: str | None):
        self.name, self.value, self.flag = name, value, flag

    def __format__(self, spec: str) -> str:
        if spec == "value":
            return str(self.value)
        if spec == "name":
            return self.flag or self.name
        if spec:
            raise ValueError(f"argument_error: format spec {spec!r} of {{{self.name}}}: use name, value or none")
        if self.flag is None:
            return f"{self.name}={self.value!r}"
        words = self.value if isinstance(self.value, (list, tuple)) else [self.value]  # as typed: --image-size H W
        return " ".join([self.flag, *(str(w) for w in words)])


def _render(template: str, values: Mapping, flag: Callable[[str], str] | None) -> str:
    return template.format(**{k: _Field(k, v, flag(k) if flag else None) for k, v in values.items()})


def argument_error(error: type[Exception], template: str, /, **values) -> Exception:
    """An ``error`` (ValueError, FileNotFoundError, ...) whose message is ``template`` in argument names; it carries
    the template and values so the command line can word it in its flags (cli_message)."""
    exc = error(_render(template, values, None))
    exc.argument_template, exc.argument_values = template, values
    return exc


def cli_message(exc: BaseException, flag: Callable[[str], str]) -> str:
    """``exc``'s message with each argument as the command-line flag ``flag(name)`` that sets it; the message as it
    is for an error that argument_error did not make."""
    template = getattr(exc, "argument_template", None)
    if template is None:
        return str(exc)
    return _render(template, exc.argument_values, flag)
