"""Skills: what actions do -- the guarded HTTP client, SSRF rules and notification channels.

Modules: the SSRF rules, pure -- :mod:`.urls` (URL text), :mod:`.addresses` (address
classes, what no allowlist opens), :mod:`.allowlist` (what the settings open),
:mod:`.ssrf` (the decisions), :mod:`.verdicts` (refusal reasons); :mod:`.http_spec`
(``call_api`` config), :mod:`.http` (guarded client), :mod:`.notification_config` and
:mod:`.notifications` (channels), :mod:`.smtp` (email), :mod:`._validation` (secret
references and their allowlist), :mod:`.admission` (creation-time checks that need the
settings), :mod:`.errors` (exceptions), :mod:`.executors` (task-layer entry points).
See ``docs/security.md``.
"""
