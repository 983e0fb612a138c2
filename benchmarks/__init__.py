"""The benchmark behind `cairn bench` (the `bench` extra adds its peers). Nothing imports it
but the command."""

__all__: list[str] = []
