"""Errors an agent raises, and errors the SDK raises for wrong configuration."""

from __future__ import annotations


class NonRetryableError(Exception):
    """Raise from `Agent.handle` when trying the task again cannot help.

    The worker reports it as `TaskError(retryable=False)`, so the coordinator fails the step
    instead of spending more attempts (and money) on it. Any other exception is reported as
    retryable.
    """


class AgentConfigError(ValueError):
    """An agent process is configured wrongly; the message names the setting and the fix."""
