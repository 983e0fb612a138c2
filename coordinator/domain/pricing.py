"""The versioned price table that turns reported usage into charges: exact decimals, no I/O."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field

from cairn.events import Frozen, Usage

MILLION = Decimal(1_000_000)


class ModelPrice(Frozen):
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)


class PriceTable(Frozen):
    """Per-model token prices under one version name."""

    version: str
    currency: str = "USD"
    models: dict[str, ModelPrice]

    def charge(self, usage: Usage) -> Decimal | None:
        """The exact price of one usage record, or None for a model the table does not know."""
        price = self.models.get(usage.model)
        if price is None:
            return None
        return (
            Decimal(usage.input_tokens) * price.input_per_mtok
            + Decimal(usage.output_tokens) * price.output_per_mtok
        ) / MILLION
