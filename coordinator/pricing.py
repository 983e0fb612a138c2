"""Loading the versioned price table (`CAIRN_PRICES`, or the one shipped with cairn); the
table itself and how it prices usage are in `domain/pricing.py`."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from cairn.coordinator.domain.pricing import PriceTable


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
