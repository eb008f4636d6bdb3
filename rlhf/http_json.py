"""Request bodies of the HTTP doors (``rlhf/http.py``): JSON read within the size limit with
errors that say where it broke, typed field reads that name the field and the type expected
(OpenAI's wording), and protobuf's JSON mapping for the project's own JSON APIs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from rlhf.http import MAX_BODY, HttpError, invalid

M = TypeVar("M", bound=Message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 413 when over the size limit, 400 when not JSON."""
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None, limit) from None
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise _unreadable(f"the request body is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise _unreadable(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise _unreadable(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _unreadable(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _unreadable(message: str) -> HttpError:
    # 400 in every style: TGI's 422 is for a well-formed request with bad values.
    return HttpError(grpc.StatusCode.INVALID_ARGUMENT, message, status=400)


def parse_proto(body: Any, message: M, where: str = "") -> M:
    """A JSON value into ``message`` by protobuf's JSON mapping (the project's own JSON APIs);
    an unknown field or a wrong type is a 400 naming it."""
    try:
        return json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        raise invalid(f"{where}{exc}".replace("\n", " ")) from None


def proto_json(message: Message) -> dict[str, Any]:
    """``message`` in protobuf's JSON mapping, with the .proto field names and every field."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _too_large(size: int | None, limit: int) -> HttpError:
    got = f"{size} bytes" if size is not None else "more"
    return HttpError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request body is {got}, over the limit of {limit} bytes",
        status=413,
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Fields:
    """Typed reads from a JSON object; a wrong type is a 400 naming the field.

    A missing field and an explicit ``null`` both read as None (the APIs served here treat
    ``null`` as "use the default").
    """

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self._prefix = prefix

    def name(self, field: str) -> str:
        return f"{self._prefix}{field}"

    def _wrong(self, field: str, expected: str, value: Any) -> HttpError:
        return invalid(
            f"Invalid type for '{self.name(field)}': expected {expected}, "
            f"but got {_kind(value)} instead.",
            self.name(field),
        )

    def out_of_range(self, field: str, value: Any, allowed: str) -> HttpError:
        return invalid(
            f"Invalid value for '{self.name(field)}': {value!r}; expected {allowed}.",
            self.name(field),
        )

    def string(self, field: str) -> str | None:
        value = self.data.get(field)
        if value is not None and not isinstance(value, str):
            raise self._wrong(field, "a string", value)
        return value

    def boolean(self, field: str) -> bool | None:
        value = self.data.get(field)
        if value is not None and not isinstance(value, bool):
            raise self._wrong(field, "a boolean", value)
        return value

    def integer(self, field: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(field, "an integer", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.out_of_range(field, value, _range(lo, hi))
        return value

    def number(self, field: str, lo: float | None = None, hi: float | None = None) -> float | None:
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(field, "a number", value)
        number = float(value)
        if (
            not math.isfinite(number)
            or (lo is not None and number < lo)
            or (hi is not None and number > hi)
        ):
            raise self.out_of_range(field, value, _range(lo, hi))
        return number

    def strings(self, field: str, max_items: int | None = None) -> list[str] | None:
        """A string or an array of strings (as OpenAI's ``stop``), as a list."""
        value = self.data.get(field)
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self._wrong(field, "a string or an array of strings", value)
        if max_items is not None and len(items) > max_items:
            raise self.out_of_range(field, value, f"at most {max_items} entries")
        return items

    def object(self, field: str) -> Fields | None:
        value = self.data.get(field)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._wrong(field, "an object", value)
        return Fields(value, f"{self.name(field)}.")

    def only(self, allowed: Iterable[str]) -> None:
        """Rejects any field not in ``allowed``, as OpenAI does."""
        known = set(allowed)
        for field in self.data:
            if field not in known:
                raise invalid(
                    f"Unrecognized request argument supplied: {self.name(field)}", self.name(field)
                )

    def unsupported(self, field: str, default: Any = None) -> None:
        """Refuses a field this server does not implement unless it holds its no-op default."""
        value = self.data.get(field)
        if value is not None and value != default and value not in ({}, []):
            raise invalid(
                f"'{self.name(field)}' is not supported by this server "
                f"(leave it unset{'' if default is None else f' or {default!r}'})",
                self.name(field),
            )


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"a value in [{lo}, {hi}]"
    return f"a value >= {lo}" if lo is not None else f"a value <= {hi}"
