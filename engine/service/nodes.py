"""Where the service collects: one database (single instance) or named nodes (multiconnect).

Nodes come from ``MSGGC_NODES="wacore1=postgresql://...,wacore2=postgresql://..."`` (or
``--nodes``) or from the ``nodes`` table of the config file. Without nodes the service runs on
one database (``--dsn``/``MSGGC_DSN``/the embedded server) and answers in the seed's
single-instance shape: no node keys in the answer, no ``node`` in the webhook.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from psycopg import conninfo

from engine.config import mask_dsn, scrub_dsn
from engine.errors import DatabaseUnreachable, UsageError

SINGLE_LABEL = "postgresql"
"""How error details name the database of a single instance (the seed says ``wacore``)."""

NODE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.:-]*"
_ENTRY_SPLIT = re.compile(rf",\s*(?={NODE_NAME}=)")
"""Entries split on a comma followed by ``name=``, so a multi-host URI's commas stay inside it."""


TARGET_KEYS = ("table", "key", "processed_column", "where")
"""What a node's entry in the config file may say of its own table, where it differs."""


@dataclass(frozen=True)
class Node:
    """A database the service collects; ``name`` is empty for the single instance."""

    name: str
    dsn: str
    target: Mapping[str, str] = field(default_factory=dict)
    """The node's own table settings (``TARGET_KEYS``), where they differ from the service's."""

    @property
    def label(self) -> str:
        return self.name or SINGLE_LABEL

    @property
    def address(self) -> str:
        """``host:port`` as the client would check it (the seed's ``wacore:6252``)."""
        params = conninfo.conninfo_to_dict(self.dsn)
        host = str(params.get("host") or params.get("hostaddr") or "localhost").split(",")[0]
        port = str(params.get("port") or "5432").split(",")[0]
        return f"{host}:{port}"


def parse_nodes(spec: str) -> dict[str, str]:
    """``name=dsn,name=dsn`` (the ``MSGGC_NODES`` format) into an ordered mapping."""
    mapping: dict[str, str] = {}
    for entry in _ENTRY_SPLIT.split(spec.strip()):
        name, eq, dsn = entry.strip().partition("=")
        if not eq or not name.strip() or not dsn.strip():
            raise UsageError(f"invalid node entry {entry.strip()!r}: expected NAME=DSN")
        name = name.strip()
        if name in mapping:
            raise UsageError(f"node {name!r} is configured twice")
        mapping[name] = dsn.strip()
    return mapping


def build_nodes(mapping: Mapping[str, object]) -> tuple[Node, ...]:
    """Validated multiconnect nodes, in configuration order."""
    if not mapping:
        raise UsageError("the nodes configuration is empty")
    nodes = []
    for name, entry in mapping.items():
        if not re.fullmatch(NODE_NAME, name):
            raise UsageError(f"invalid node name {name!r}: use letters, digits and _ . : -")
        dsn, target = _entry(name, entry)
        nodes.append(Node(name=name, dsn=_checked_dsn(dsn, name), target=target))
    return tuple(nodes)


def _entry(name: str, entry: object) -> tuple[str, dict[str, str]]:
    """``name = "DSN"``, or a table ``{dsn = "...", table = "...", key = ..., ...}``."""
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("dsn"), str):
        raise UsageError(f"node {name!r}: expected a DSN string, or a table with a dsn string")
    unknown = sorted(set(entry) - {"dsn", *TARGET_KEYS})
    if unknown:
        raise UsageError(f"node {name!r}: unknown key(s) {', '.join(unknown)};"
                         f" known: dsn, {', '.join(TARGET_KEYS)}")
    if not all(isinstance(entry[key], str) for key in TARGET_KEYS if key in entry):
        raise UsageError(f"node {name!r}: {', '.join(TARGET_KEYS)} must be strings")
    return entry["dsn"], {key: entry[key] for key in TARGET_KEYS if key in entry}


def single(dsn: str) -> tuple[Node, ...]:
    return (Node(name="", dsn=_checked_dsn(dsn, SINGLE_LABEL)),)


def _checked_dsn(dsn: str, label: str) -> str:
    try:
        conninfo.conninfo_to_dict(dsn)
    except Exception as exc:
        raise UsageError(f"node {label}: invalid DSN {mask_dsn(dsn)!r}: {scrub_dsn(str(exc), dsn)}") from None
    return dsn


def unreachable_details(node: Node, exc: DatabaseUnreachable) -> str:
    """The seed's wording: ``<cause>. Please check if <node> is running: <host:port>``."""
    return f"{_cause(str(exc), node.dsn)}. Please check if {node.label} is running: {node.address}"


def _cause(message: str, dsn: str) -> str:
    """The driver's reason without the DSN or libpq's hint: ``Connection refused``."""
    text = message.removeprefix(f"cannot connect to {mask_dsn(dsn)}: ")
    text = text.rsplit(" failed: ", 1)[-1]
    text = text.split(" Is the server running", 1)[0].strip().rstrip(".")
    return text[:1].upper() + text[1:] if text else "Connection failed"
