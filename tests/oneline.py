"""The project's one-line-error check, shared by the tests of user-facing errors."""

from __future__ import annotations


def one_line(message: str) -> str:
    """``message`` if it is one line without a traceback (what every GenlabError shown to people must be)."""
    text = message.strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def one_line_error(capsys) -> str:
    """The CLI's stderr after a user error: exactly ``error: ...`` on one line, no traceback."""
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: "), err
    return err
