"""The coordinator's rules, pure: `decide(state, fact, policy) -> events` and
`evolve(state, event) -> state`. No NATS, no database, no clock: the time and every input come
with the fact, so running this code over a recorded history reproduces its decisions."""

__all__: list[str] = []
