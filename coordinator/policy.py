"""The policy decisions are made under, put together in one place for the coordinator, for
replay and for the bench: a price table, the registered output contracts and the default
estimate. It loads files (the price table, the contract modules), so it is not in the pure
`domain/`.
"""

from __future__ import annotations

from decimal import Decimal

from cairn.coordinator.domain.facts import DEFAULT_ESTIMATE_USD, Policy
from cairn.coordinator.domain.pricing import PriceTable
from cairn.coordinator.pricing import load_price_table
from cairn.coordinator.workflow import load_contract_modules
from cairn.events.contracts import resolve_contract


def decision_policy(
    prices: PriceTable | None = None, *, default_estimate_usd: Decimal = DEFAULT_ESTIMATE_USD
) -> Policy:
    """Decide with `prices` (default: the table shipped with cairn), the output contracts the
    contract modules register (`CAIRN_CONTRACTS` adds modules), and `default_estimate_usd` for
    a step without an estimate of its own."""
    load_contract_modules()
    return Policy(
        prices if prices is not None else load_price_table(),
        resolve_contract,
        default_estimate_usd=default_estimate_usd,
    )
