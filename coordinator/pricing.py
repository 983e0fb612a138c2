"""The versioned price table that turns reported usage into charges."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

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


class PriceTableError(ValueError):
    """The price table file is missing or malformed."""


def load_price_table(path: Path | None = None) -> PriceTable:
    """The table at `path` (CAIRN_PRICES), or the one shipped with cairn."""
    try:
        text = path.read_text() if path else Path(__file__).with_name("prices.yaml").read_text()
        return PriceTable.model_validate(yaml.safe_load(text))
    except OSError as exc:
        raise PriceTableError(f"cannot read price table {path}: {exc.strerror}") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise PriceTableError(f"price table {path or 'prices.yaml'} is invalid: {exc}") from None
