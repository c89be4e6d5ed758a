"""The package's public surface: what `import taskpool` offers."""

from __future__ import annotations

import inspect
import types

import pytest

import taskpool


def public_names() -> set[str]:
    """Names bound in the package namespace that are public and not modules."""
    return {
        name
        for name, value in vars(taskpool).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def own_doc(obj: object) -> str | None:
    """The docstring `obj` itself was written with, ignoring generated or inherited ones."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        # dataclasses and enums generate a docstring when the class has none
        if doc and (doc.startswith(f"{obj.__name__}(") or doc == "An enumeration."):
            return None
        return doc if isinstance(doc, str) else None
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def test_all_lists_exactly_the_public_names() -> None:
    """`__all__` names every public non-module name of the package, and nothing else."""
    assert set(taskpool.__all__) == public_names()


def test_all_is_sorted_without_duplicates() -> None:
    """`__all__` is kept sorted and lists each name once."""
    assert taskpool.__all__ == sorted(set(taskpool.__all__))


@pytest.mark.parametrize("name", taskpool.__all__)
def test_exported_name_has_a_docstring(name: str) -> None:
    """Every exported name carries its own docstring."""
    doc = own_doc(getattr(taskpool, name))
    assert doc is not None
    assert doc.strip(), name


def test_package_has_a_docstring() -> None:
    """The package itself says what it is."""
    assert taskpool.__doc__
    assert taskpool.__doc__.strip()
