"""A run's record read back: the hash chain checked (`verify`), a history moved as a file
(`portable`), recorded histories decided again with today's code (`replay`), two runs compared
(`diff`)."""

__all__: list[str] = []
