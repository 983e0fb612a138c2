"""Output contracts: pydantic models known by name and version ("Plan@1").

A workflow step names the contract its output must meet; the coordinator validates every
output against it before the next step may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=type[BaseModel])

_CONTRACTS: dict[str, type[BaseModel]] = {}


class UnknownContractError(LookupError):
    """A workflow names a contract no loaded module registered."""


def contract(name: str, version: int = 1) -> Callable[[M], M]:
    """Register a model as the contract `name@version` (class decorator)."""

    def register(model: M) -> M:
        key = f"{name}@{version}"
        existing = _CONTRACTS.get(key)
        if existing is not None and existing.__qualname__ != model.__qualname__:
            raise ValueError(f"contract {key} is registered twice")
        _CONTRACTS[key] = model
        return model

    return register


def resolve_contract(key: str) -> type[BaseModel]:
    """The model registered as `key` ("Name@version"; "Name" means version 1)."""
    if "@" not in key:
        key = f"{key}@1"
    try:
        return _CONTRACTS[key]
    except KeyError:
        known = ", ".join(sorted(_CONTRACTS)) or "none"
        raise UnknownContractError(f"unknown output contract {key!r} (known: {known})") from None


def known_contracts() -> list[str]:
    return sorted(_CONTRACTS)
