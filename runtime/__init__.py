"""What every cairn process shares: settings (every `CAIRN_*` variable), the NATS connection
and streams (`connection`, `pull`), waiting at start for NATS or a database (`waiting`), NATS
roles and their permissions (`roles`), the embedded server (`embedded`), liveness (`health`),
crash points for fault tests (`crashpoints`), the process supervisor (`supervisor`, with
`tether` and `homelock`), dead letters (`deadletters`), tracing setup (`tracing`), the command
client (`client`) and the event log (`eventlog`: the store, large outputs kept apart,
PostgreSQL setup).

Imports only `cairn.events`. Importing this package loads none of its modules: an agent takes
what it needs (`cairn.runtime.connection`, ...) and never loads the event log.
"""

__all__: list[str] = []
