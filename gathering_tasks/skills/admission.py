"""Creation-time checks of skill configs that depend on the deployment's settings.

The config schemas (:mod:`.http_spec`, :mod:`.notification_config`) judge a config on its
own. Two more rules need the settings; :func:`admit` applies them when an action is created
or updated (``gathering_tasks.actions.validate_action``), so that a config every run would
refuse is refused at the door, with an :class:`~gathering_tasks.errors.InvalidInput` naming
the field (exit 2 at the CLI):

* a URL whose host is a literal address the allowlist does not open (``169.254.169.254``,
  ``[::1]``, ``2130706433``) or a ``localhost`` name is refused with the reason the worker
  would give (``request refused (cloud-metadata): 169.254.169.254``). Names are judged when
  the run resolves them: their addresses may change.
* a secret may only be referenced by a name ``GATHERING_SECRET_ENV_ALLOW`` matches.

Both rules are applied again at run time: settings change, and configs stored before a rule
existed are not validated again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills._validation import SecretPolicy
from gathering_tasks.skills.allowlist import AllowList
from gathering_tasks.skills.errors import SsrfRefused
from gathering_tasks.skills.http_spec import parse_call_api_config
from gathering_tasks.skills.notification_config import parse_notification_config
from gathering_tasks.skills.ssrf import check_target
from gathering_tasks.skills.urls import parse_url

if TYPE_CHECKING:
    from gathering_tasks.settings import Settings


class References(Protocol):
    """A parsed skill config: the URLs it names and the secrets it references."""

    def target_urls(self) -> list[tuple[str, str]]: ...

    def secret_refs(self) -> list[tuple[str, str]]: ...


# The action types whose configs name URLs or secrets, and how each config is parsed.
_PARSERS: dict[str, Callable[[Mapping[str, Any]], References]] = {
    "call_api": parse_call_api_config,
    "send_notification": parse_notification_config,
}


@dataclass(frozen=True)
class Admission:
    """What the door needs to know of the settings: the HTTP allowlist and the secret one."""

    allow: AllowList = field(default_factory=AllowList)
    secrets: SecretPolicy = field(default_factory=SecretPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> Admission:
        """The rules configured by ``GATHERING_HTTP_ALLOW_*`` and ``GATHERING_SECRET_ENV_ALLOW``."""
        allow = AllowList.parse(
            settings.http_allow_networks,
            settings.http_allow_hosts,
            settings.http_allow_metadata_address_i_know_this_is_dangerous,
        )
        return cls(allow, SecretPolicy(tuple(settings.secret_env_allow)))


def _check_url(where: str, url: str, allow: AllowList) -> None:
    try:
        check_target(parse_url(url), allow)
    except SsrfRefused as exc:
        raise InvalidInput(str(exc), field=where) from None


def admit(action_type: str, config: Mapping[str, Any], admission: Admission) -> None:
    """Refuse what every run of this config would refuse (see the module docstring).

    ``config`` has passed its schema already. Fields are relative to the config (``url``,
    ``auth.token_env``, ``channels.1.secret_env``); other action types pass untouched.
    """
    parse = _PARSERS.get(action_type)
    if parse is None:
        return
    parsed = parse(config)
    for where, url in parsed.target_urls():
        _check_url(where, url, admission.allow)
    for where, name in parsed.secret_refs():
        admission.secrets.check(name, where)
