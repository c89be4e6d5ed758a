"""`redact`: the one function that hides passwords in what taskpool prints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskpool._redact import MASK, dsn_secrets, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:hunter2@db:5432/app", "postgresql://u:***@db:5432/app"),
        ("postgres://u:hunt@r2@db/app", "postgres://u:***@db/app"),
        ("postgresql://:hunter2@db/app", "postgresql://:***@db/app"),
        ("postgresql://u:p%40ss@[::1]:5432/app", "postgresql://u:***@[::1]:5432/app"),
        ("worker on postgresql://u:x@h/db, node 3", "worker on postgresql://u:***@h/db, node 3"),
        (
            "postgresql://h/db?user=u&password=hunter2&x=1",
            "postgresql://h/db?user=u&password=***&x=1",
        ),
        ("host=h password=hunter2 user=u", "host=h password=*** user=u"),
        ("host=h password='two words' user=u", "host=h password=*** user=u"),
        ("host=h PASSWORD = hunter2", "host=h PASSWORD = ***"),
        ("PGPASSWORD=hunter2 psql", "PGPASSWORD=*** psql"),
        ("pwd=hunter2;passwd=x", "pwd=***;passwd=***"),
    ],
)
def test_redact_hides_every_form_of_password(text: str, expected: str) -> None:
    """URL user info, password= keywords (bare, quoted, in a query) and PGPASSWORD are masked."""
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u@h:5432/db",
        "tasks.db",
        "/srv/data/tasks.db",
        "http://example.com/a:b@c",  # a ':' and '@' in a path, not in user info
        "no task 42",
    ],
)
def test_redact_leaves_text_without_a_password_alone(text: str) -> None:
    """Text that carries no password comes back unchanged."""
    assert redact(text) == text


def test_redact_hides_given_secrets_wherever_they_appear() -> None:
    """A driver message quoting the password without its keyword is masked by value."""
    secrets = dsn_secrets("postgresql://u:p%40ss@h/db")
    assert set(secrets) == {"p%40ss", "p@ss"}
    assert (
        redact("auth failed for 'p@ss' (p%40ss)", secrets=secrets)
        == f"auth failed for '{MASK}' ({MASK})"
    )


def test_dsn_secrets_of_a_dsn_without_password_is_empty() -> None:
    """Nothing to hide, nothing masked."""
    assert dsn_secrets("postgresql://u@h/db") == ()
    assert dsn_secrets("tasks.db") == ()


_PASSWORDS = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#"), min_size=1
)


@given(password=_PASSWORDS)
def test_no_url_password_survives(password: str) -> None:
    """Whatever printable password a URL carries, none of it is left after redaction."""
    assert redact(f"on postgresql://user:{password}@host:5432/db now") == (
        f"on postgresql://user:{MASK}@host:5432/db now"
    )


@given(
    password=st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="'\"&;,"),
        min_size=1,
    )
)
def test_no_keyword_password_survives(password: str) -> None:
    """Whatever bare password a conninfo string carries, none of it is left."""
    assert redact(f"host=h password={password} user=u") == f"host=h password={MASK} user=u"
