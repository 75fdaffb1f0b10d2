"""Multipart bodies read strictly: werkzeug's form parser, with its refusals said as they are.

Out of the box werkzeug reads a multipart body it cannot parse (no boundary, a boundary that never
appears, a body cut inside a part) as an empty form, so the client hears "'prompt' is required"; and
its own limits (MAX_FORM_PARTS parts, MAX_FORM_MEMORY_SIZE bytes in one text field) raise the same
413 as the whole body's cap. Here the first is 400 `malformed body` and the second a 413 that names
the form parser's limits; the body's own cap (MAX_CONTENT_LENGTH_MB) keeps its answer.
"""
from __future__ import annotations

from typing import IO, Any

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from utils.errors import InvalidInput, PayloadTooLarge


class _Counted:
    """The body stream, counting what the parser read (to tell the body's cap from the form's)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream, self.read_bytes = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.read_bytes += len(data)
        return data


class StrictFormParser(FormDataParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.silent = False  # a ValueError is a malformed body, not an empty form

    def parse(self, stream: IO[bytes], mimetype: str, content_length: int | None,
              options: dict[str, str] | None = None):
        if mimetype != "multipart/form-data":
            return super().parse(stream, mimetype, content_length, options)
        counted = _Counted(stream)
        try:
            return super().parse(counted, mimetype, content_length, options)
        except ValueError as exc:
            raise InvalidInput(f"the multipart/form-data body cannot be read ({exc}); send it with the boundary "
                               f"its Content-Type names", error="malformed body") from None
        except RequestEntityTooLarge:
            cap = self.max_content_length
            if cap is not None and (counted.read_bytes >= cap or (content_length or 0) > cap):
                raise  # the whole body's cap: answered as such by the app
            raise PayloadTooLarge(f"the form is over the form parser's limits: at most {self.max_form_parts} parts, "
                                  f"and at most {(self.max_form_memory_size or 0) / 1000:g} KB in one text field "
                                  f"(a file may be larger)") from None
