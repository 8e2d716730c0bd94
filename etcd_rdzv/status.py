"""A gRPC status on its own, without the call (or traceback) it came from."""

from __future__ import annotations

import grpc


class RpcStatus(grpc.RpcError):
    """A failure with a gRPC status code and details, like the error of a call. Made afresh for
    each raise: an error kept for later (the client's last failure, a failed stream's) must not
    hold the frames of every thread that raised it, and with them the objects they used."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    @classmethod
    def of(cls, error: grpc.RpcError) -> RpcStatus:
        return cls(error.code(), error.details() or "")

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details
