"""A request body as JSON, or a 400: plain, finite, shallow, encodable JSON only, checked before pydantic sees it."""
from __future__ import annotations

import json
import math
from typing import Any

from llava_core.serve.errors import bad_request

# A chat request nests about 6 deep (messages[0].content[1].image_url.url); thousands deep exhausts the parser's stack.
MAX_JSON_DEPTH = 32
# A 64-bit seed has 20 digits; a 5,000-digit literal costs quadratic time to convert and Python refuses it anyway.
MAX_NUMBER_CHARS = 40


def parse_json_body(data: bytes) -> Any:
    """A request body as JSON, or a 400 for anything that is not plain, finite, shallow, encodable JSON."""
    try:
        body = json.loads(data, parse_int=bounded_int, parse_float=bounded_float, parse_constant=no_constant)
    except RecursionError:
        raise bad_request(f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    check_shape(body)
    return body


def bounded_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise bad_request(f"the request body has a number of {len(literal)} digits; numbers are limited to "
                          f"{MAX_NUMBER_CHARS} characters")
    return int(literal)


def bounded_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise bad_request(f"the request body has a number of {len(literal)} characters; numbers are limited to "
                          f"{MAX_NUMBER_CHARS}")
    value = float(literal)
    if not math.isfinite(value):
        raise bad_request(f"the request body has the number {literal}, which is out of range")
    return value


def no_constant(name: str):
    raise bad_request(f"the request body has {name}, which is not JSON; numbers must be finite")


def children(value: Any) -> list:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return value if isinstance(value, list) else []


def check_shape(body: Any) -> None:
    """Depth and strings, level by level: iterative, so a deep body cannot exhaust the stack as recursion would."""
    level, depth = [body], 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
        for value in level:
            if isinstance(value, str):
                check_encodable(value)
        level = [child for value in level for child in children(value)]


def check_encodable(text: str) -> None:
    # JSON's `\ud800` escape of half a UTF-16 pair parses to a lone surrogate, which no UTF-8 encoder (the
    # tokenizer's, the response's) takes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the request body has a lone UTF-16 surrogate (such as the escape \\ud800) in a string; "
                          "send text as valid Unicode") from None
