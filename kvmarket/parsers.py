"""The API's JSON parser: refuses strings that no tokenizer or PostgreSQL text column takes.

JSON can spell a NUL (\\u0000) and an unpaired UTF-16 surrogate (\\ud800); Python decodes
both into a str that later fails deep inside the tokenizer or the database driver. Refusing
them while parsing answers 422 with the field's path before any work starts.
"""

from typing import Any

from rest_framework import exceptions
from rest_framework.parsers import JSONParser


def find_nul_or_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) in ``value`` holding a NUL character or an
    unpaired UTF-16 surrogate (JSON can spell both, no tokenizer or PostgreSQL text takes
    them); None when there is none."""
    if isinstance(value, str):
        if "\x00" in value:
            return path or "body"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = find_nul_or_surrogate(key, where) or find_nul_or_surrogate(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_nul_or_surrogate(item, f"{path}[{index}]" if path else f"[{index}]")
            if found:
                return found
    return None


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, refusing (422) strings with a NUL or an unpaired surrogate."""

    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        where = find_nul_or_surrogate(data)
        if where is not None:
            # The path may hold the offending key itself: make it printable in the answer.
            where = where.encode("utf-8", "replace").decode().replace("\x00", "?")
            raise exceptions.ValidationError(
                {where: ["Text may not contain NUL characters or unpaired surrogates."]}
            )
        return data
