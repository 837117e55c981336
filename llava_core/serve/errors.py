"""Errors in the OpenAI API's shape, so OpenAI clients raise their usual typed exceptions with our message."""
from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    """A request the server refuses; becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 error_type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


def model_not_found(name: str, served: str) -> ApiError:
    """OpenAI's 404 for an unknown model, naming the one this endpoint serves (the usual mistake is a name)."""
    return ApiError(404, f"The model `{name}` does not exist. This endpoint serves `{served}`.", "model",
                    "model_not_found")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, None, "invalid_api_key")


def payload_too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more, over this server's limit of {limit} bytes",
                    None, "request_too_large")


def body_timeout(timeout_s: float) -> ApiError:
    return ApiError(408, f"the request body was not received within {timeout_s:g}s", None, "request_timeout")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, None, "service_unavailable", "server_error", headers={"Retry-After": "1"})
