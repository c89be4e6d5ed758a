"""The suite's own helpers: reading the task id out of an attempt marker."""

from __future__ import annotations

import pytest

from tests.helpers import marker_task_id


@pytest.mark.parametrize(
    ("marker", "task_id"),
    [
        ("900:1", "900"),  # <task_id>:<fence>, the format before store ids
        (f"{'0f' * 16}:12:3", "12"),  # <store_id>:<task_id>:<fence>
        ("junk", None),
        ("", None),
    ],
)
def test_the_task_id_is_the_second_to_last_field(marker: str, task_id: str | None) -> None:
    """Both marker formats name the task in their second-to-last field; junk names none."""
    assert marker_task_id(marker) == task_id
