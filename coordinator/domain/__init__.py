"""The coordinator's rules, pure: `decide(state, fact, policy) -> events` and
`evolve(state, event) -> state`. No NATS, no database, no clock: the time and every input come
with the fact, so running this code over a recorded history reproduces its decisions.

By layer, lowest first (import-linter keeps imports going down): `mapping`, `pricing`;
`state` (the fold); `facts` (what is decided from, the policy, `fact_for`); `builder` (chaining
a decision's events); `approval_requests`; `money` and `graph`; `lifecycle` (a step's way
through a run); `approval_answers`; `decide` (one handler per fact) and `fork`.
"""

__all__: list[str] = []
