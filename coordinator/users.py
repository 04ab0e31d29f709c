"""The users of a shared coordinator: who is calling, and each user's policy.

A user is the name its API tokens carry in the client tokens file (``TOKEN [USER] [OPTION ...]``,
see :func:`qscale.security.read_token_entries`); a token that names none, and a token given by
value (``$QSCALE_CLIENT_TOKEN``), belong to :data:`DEFAULT_USER`. A user's policy is what its
lines say (``admin``, ``weight=``, ``max-jobs=``, ``max-queued-shots=``, ``max-slots=``), the
coordinator's settings (``max_jobs_per_user``, ``max_queued_shots_per_user``,
``max_slots_per_user``) where they say nothing, and weight 1.

Without authentication (no tokens configured) every caller is :data:`DEFAULT_USER` and an
admin: a coordinator on loopback without tokens behaves as a single-user one.

Example (in the servicers, on a call that passed :class:`~qscale.security.AuthInterceptor`)::

    users = Users.from_config(tokens, config)
    who = users.identify(context.invocation_metadata())   # Identity(user='alice', admin=False)
    policy = users.get(who.user)                          # User(name='alice', weight=2.0, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qscale.errors import UnauthenticatedError
from qscale.security import DEFAULT_USER, Tokens, _bearer

if TYPE_CHECKING:
    from qscale.coordinator.config import CoordinatorConfig

__all__ = ["DEFAULT_USER", "User", "Identity", "Users"]


@dataclass(frozen=True)
class User:
    """A user's policy, resolved: the client tokens file's options, else the coordinator's defaults."""

    name: str
    weight: float = 1.0
    """Share of the cluster relative to other users."""
    admin: bool = False
    """Sees and cancels every user's jobs, and lists every user."""
    max_jobs: int = 0
    """Most unfinished (queued or running) jobs; 0: no limit."""
    max_queued_shots: int = 0
    """Most shots of unfinished jobs not yet counted; 0: no limit."""
    max_slots: int = 0
    """Most node slots the user's shards hold at once; 0: no limit."""


@dataclass(frozen=True)
class Identity:
    """Who is calling: the user of the presented token, and whether that user is an admin."""

    user: str
    admin: bool


class Users:
    """The users of a coordinator: from its client tokens, with the config's quota defaults.

    Args:
        tokens: the tokens the coordinator accepts (their users and options).
        max_jobs, max_queued_shots, max_slots: the quotas of a user whose lines do not set
            them (0: no limit).
    """

    def __init__(self, tokens: Tokens, *, max_jobs: int = 0, max_queued_shots: int = 0, max_slots: int = 0) -> None:
        self.tokens = tokens
        self._defaults = (int(max_jobs), int(max_queued_shots), int(max_slots))
        self._declared = {name: self._resolve(name) for name in tokens.user_names()}

    @classmethod
    def from_config(cls, tokens: Tokens, config: CoordinatorConfig) -> Users:
        """The users of ``tokens``, with ``config``'s ``max_jobs_per_user``,
        ``max_queued_shots_per_user`` and ``max_slots_per_user`` as the default quotas."""
        return cls(tokens, max_jobs=config.max_jobs_per_user, max_queued_shots=config.max_queued_shots_per_user,
                   max_slots=config.max_slots_per_user)

    def __repr__(self) -> str:
        return f"Users({[u.name for u in self.declared()]!r}, authenticated={self.authenticated})"

    @property
    def authenticated(self) -> bool:
        """True when callers present tokens (and so have user names of their own)."""
        return self.tokens.enabled

    def _resolve(self, name: str) -> User:
        options = self.tokens.options_of(name)
        max_jobs, max_queued_shots, max_slots = self._defaults
        return User(
            name=name,
            weight=1.0 if options.weight is None else float(options.weight),
            admin=bool(options.admin),
            max_jobs=max_jobs if options.max_jobs is None else options.max_jobs,
            max_queued_shots=max_queued_shots if options.max_queued_shots is None else options.max_queued_shots,
            max_slots=max_slots if options.max_slots is None else options.max_slots,
        )

    def get(self, name: str) -> User:
        """The policy of user ``name``: a declared user's, or the defaults (weight 1, the
        config's quotas, no admin) for any other name (e.g. the owner of an old job whose
        tokens were removed since)."""
        found = self._declared.get(name)
        return found if found is not None else self._resolve(name)

    def declared(self) -> list[User]:
        """The users named in the client tokens (:data:`DEFAULT_USER` too when a token names
        none), sorted by name; empty without authentication."""
        return [self._declared[name] for name in sorted(self._declared)]

    def identify_token(self, token: str | None) -> Identity | None:
        """The identity of a client token (the dashboard's check); None when it is none of our
        client tokens. Without authentication: ``Identity(DEFAULT_USER, admin=True)`` whatever
        the token. Constant time in the token (:meth:`Tokens.user_of`)."""
        if not self.authenticated:
            return Identity(DEFAULT_USER, True)
        user = self.tokens.user_of(token)
        if user is None:
            return None
        return Identity(user, self.get(user).admin)

    def identify(self, metadata: Sequence[Any] | None) -> Identity:
        """The caller of a gRPC call, from its invocation metadata (``authorization: Bearer
        <token>``). Without authentication: ``Identity(DEFAULT_USER, admin=True)``.

        Raises:
            UnauthenticatedError: authentication is on and the call carries no client token of
                ours (the :class:`~qscale.security.AuthInterceptor` refuses such calls first).
        """
        identity = self.identify_token(_bearer(metadata) if self.authenticated else None)
        if identity is None:
            raise UnauthenticatedError("missing or invalid credentials; send 'authorization: Bearer <token>' with "
                                       "a client token")
        return identity
