"""The bodies of the WhatsApp Business On-Premises ``/v1/services/message/gc`` contract.

Shapes follow ``tests/fixtures/messages-gc-endpoint.txt`` key for key (and in its key order); the
seed's failure example has trailing commas, ours is always valid JSON.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

INTERNAL_ERROR = 1014
ACCESS_DENIED = 1005
RESOURCE_NOT_FOUND = 1006
PARAMETER_NOT_VALID = 1009
INVALID_REQUEST = 1025
TITLES = {
    ACCESS_DENIED: "Access denied",
    RESOURCE_NOT_FOUND: "Resource not found",
    PARAMETER_NOT_VALID: "Parameter value is not valid",
    INTERNAL_ERROR: "Internal error",
    INVALID_REQUEST: "Invalid request",
}
"""Only 1014 is in the seed; the others follow the On-Premises API's list of error codes."""


def package_version() -> str:
    try:
        return version("msggc")
    except PackageNotFoundError:  # running from a source tree without install
        return "0.0.0"


def meta() -> dict[str, str]:
    return {"api_status": "stable", "version": package_version()}


def error(details: str, *, title: bool = True, code: int = INTERNAL_ERROR) -> dict[str, Any]:
    """One entry of an ``errors`` list; the completion webhook's entries carry no title."""
    entry: dict[str, Any] = {"code": code}
    if title:
        entry["title"] = TITLES[code]
    entry["details"] = details
    return entry


def completion(messages_deleted: int, *, node: str | None = None,
               failure: str | None = None) -> dict[str, Any]:
    """The completion webhook body: ``complete``, or ``failed`` with an ``errors`` list."""
    gc: dict[str, Any] = {"messages_deleted": messages_deleted}
    if node:
        gc["node"] = node
    if failure is None:
        gc["status"] = "complete"
    else:
        gc["errors"] = [error(failure, title=False)]
        gc["status"] = "failed"
    return {"services": [{"message": {"gc": gc}}]}


def processing() -> dict[str, Any]:
    return {"status": "processing"}


def start_answer(gc: dict[str, Any]) -> dict[str, Any]:
    """The PUT answer: ``gc`` is ``{"status": ...}`` (single) or one entry per node."""
    return {"services": {"message": {"gc": gc}}, "meta": meta()}


def error_answer(details: str, *, code: int = INTERNAL_ERROR) -> dict[str, Any]:
    return errors_answer([error(details, code=code)])


def errors_answer(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """An HTTP error answer: ``meta`` and the ``errors`` list, as in the seed's single instance."""
    return {"meta": meta(), "errors": entries}


def node_failure(details: str) -> dict[str, Any]:
    """A multiconnect node that could not start: its key holds only an ``errors`` list."""
    return {"errors": [error(details)]}
