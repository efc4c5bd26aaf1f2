"""The bodies of the WhatsApp Business On-Premises ``/v1/services/message/gc`` contract.

Shapes follow ``shared/seed/messages-gc-endpoint.txt`` key for key (and in its key order); the
seed's failure example has trailing commas, ours is always valid JSON.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

INTERNAL_ERROR = 1014


def package_version() -> str:
    try:
        return version("msggc")
    except PackageNotFoundError:  # running from a source tree without install
        return "0.0.0"


def meta() -> dict[str, str]:
    return {"api_status": "stable", "version": package_version()}


def error(details: str, *, title: bool = True) -> dict[str, Any]:
    """One entry of an ``errors`` list; the completion webhook's entries carry no title."""
    entry: dict[str, Any] = {"code": INTERNAL_ERROR}
    if title:
        entry["title"] = "Internal error"
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


def error_answer(details: str) -> dict[str, Any]:
    return {"meta": meta(), "errors": [error(details)]}
