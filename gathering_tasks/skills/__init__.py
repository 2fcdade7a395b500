"""Skills: what actions do -- the guarded HTTP client, SSRF rules and notification channels.

Modules: :mod:`.ssrf` (pure SSRF decisions), :mod:`.http_spec` (``call_api`` config),
:mod:`.http` (guarded client), :mod:`.notification_config` and :mod:`.notifications`
(channels), :mod:`.smtp` (email), :mod:`.errors` (exceptions), :mod:`.executors` (task-layer
entry points).
"""
