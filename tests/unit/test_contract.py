"""The seed's bodies, key by key and in the seed's key order."""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine.service import contract
from engine.service.contract import completion, error_answer, processing, start_answer


def test_single_instance_completion_matches_the_seed():
    body = completion(5)
    assert body == {"services": [{"message": {"gc": {"messages_deleted": 5, "status": "complete"}}}]}
    assert list(body["services"][0]["message"]["gc"]) == ["messages_deleted", "status"]


def test_multiconnect_completion_names_the_node_between_count_and_status():
    gc = completion(11, node="wacore2:9dfe77618dba")["services"][0]["message"]["gc"]
    assert list(gc.items()) == [("messages_deleted", 11), ("node", "wacore2:9dfe77618dba"),
                                ("status", "complete")]


def test_failed_completion_is_valid_json_with_code_1014():
    body = completion(0, failure="Failed to fetch processed messages to delete")
    gc = json.loads(json.dumps(body))["services"][0]["message"]["gc"]
    assert gc == {"messages_deleted": 0,
                  "errors": [{"code": 1014, "details": "Failed to fetch processed messages to delete"}],
                  "status": "failed"}


def test_start_answer_and_error_answer_carry_meta():
    answer = start_answer(processing())
    assert answer["services"] == {"message": {"gc": {"status": "processing"}}}
    assert answer["meta"]["api_status"] == "stable"
    details = "Connection timed out. Please check if wacore is running: wacore:6252"
    error = error_answer(details)
    assert error["errors"] == [{"code": 1014, "title": "Internal error", "details": details}]


def test_the_contract_docstring_cites_a_seed_file_that_exists_in_the_repo():
    root = Path(__file__).resolve().parents[2]
    cited = re.findall(r"``([\w/.-]+\.txt)``", contract.__doc__ or "")
    assert cited, "the docstring names the seed file"
    for path in cited:
        assert (root / path).is_file(), path


def test_the_api_lists_exactly_the_statuses_a_run_can_have_in_gc_runs():
    from typing import get_args

    from engine.service.api_models import StoredStatus
    from engine.status import STORED

    assert set(get_args(StoredStatus)) == set(STORED)
