"""Users of a shared coordinator: the token file format with user names and options
(:mod:`qscale.security`), and who is calling with what policy (:mod:`qscale.coordinator.users`).
Files only, no server: the whole module takes well under a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qscale.coordinator.config import CoordinatorConfig
from qscale.coordinator.users import DEFAULT_USER, Identity, User, Users
from qscale.errors import InvalidArgumentError, UnauthenticatedError
from qscale.security import (
    CLIENT,
    NODE,
    Tokens,
    UserOptions,
    merge_user_options,
    read_token,
    read_token_entries,
    read_token_file,
)

ALICE_1 = "alice-token-one-aaaaaaaaaaaaaaaa"
ALICE_2 = "alice-token-two-bbbbbbbbbbbbbbbb"
OPS = "ops-token-cccccccccccccccccccccc"
PLAIN = "plain-token-dddddddddddddddddddd"
NODE_TOKEN = "node-token-eeeeeeeeeeeeeeeeeeee"
ENV_TOKEN = "env-token-ffffffffffffffffffffff"
SECRETS = (ALICE_1, ALICE_2, OPS, PLAIN, NODE_TOKEN, ENV_TOKEN)

CLIENT_FILE = f"""\
# API tokens: TOKEN [USER] [OPTION ...]
{ALICE_1}   alice  weight=2 max-jobs=50   # the old one
{ALICE_2}\talice
{OPS} ops admin max-queued-shots=1M max-slots=0

{PLAIN}
"""


def _write(tmp_path: Path, text: str, name: str = "client.tokens") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def _tokens(tmp_path: Path, text: str = CLIENT_FILE, **kwargs: object) -> Tokens:
    node = _write(tmp_path, f"{NODE_TOKEN} rack-1\n", "node.tokens")
    return Tokens.load(node_files=[node], client_files=[_write(tmp_path, text)], **kwargs)  # type: ignore[arg-type]


def _refused(tmp_path: Path, text: str, role: str = CLIENT) -> str:
    """The message of the error a token file holding ``text`` gets; it never shows a token."""
    path = _write(tmp_path, text, "bad.tokens")
    with pytest.raises(InvalidArgumentError) as info:
        if role == CLIENT:
            Tokens.load(client_files=[path], node_tokens=[NODE_TOKEN])
        else:
            read_token_entries(path, role)
    message = str(info.value)
    assert not any(secret in message for secret in SECRETS), message
    assert str(path) in message, message
    return message


# ------------------------------------------------------------------ the file format

def test_lines_name_users_and_options(tmp_path: Path) -> None:
    path = _write(tmp_path, CLIENT_FILE)
    entries = read_token_entries(path)
    assert [(e.user, e.named, dict(e.options)) for e in entries] == [
        ("alice", True, {"weight": 2.0, "max_jobs": 50}),
        ("alice", True, {}),
        ("ops", True, {"admin": True, "max_queued_shots": 2**20, "max_slots": 0}),
        (DEFAULT_USER, False, {}),
    ]
    assert [e.where for e in entries] == [f"token file {path}, line {n}" for n in (2, 3, 4, 6)]
    assert read_token_file(path) == (ALICE_1, ALICE_2, OPS, PLAIN)
    assert not any(secret in repr(entries) for secret in SECRETS)
    assert merge_user_options(entries) == {
        "alice": UserOptions(weight=2.0, max_jobs=50), "ops": UserOptions(admin=True, max_queued_shots=2**20,
                                                                          max_slots=0),
        DEFAULT_USER: UserOptions()}

    tokens = _tokens(tmp_path)
    assert tokens.user_of(ALICE_1) == tokens.user_of(ALICE_2) == "alice"
    assert tokens.user_of(OPS) == "ops" and tokens.user_of(PLAIN) == DEFAULT_USER
    for other in (NODE_TOKEN, "unknown-token-gggggggggggggggggg", "", None, ALICE_1 + "x", ALICE_1[:-1]):
        assert tokens.user_of(other) is None
    assert tokens.role_of(ALICE_1) == tokens.role_of(PLAIN) == CLIENT and tokens.role_of(NODE_TOKEN) == NODE
    assert tokens.user_names() == ("alice", DEFAULT_USER, "ops")
    assert tokens.options_of("ops").admin and tokens.options_of("nobody") == UserOptions()
    assert not any(secret in repr(tokens) for secret in SECRETS)


def test_a_caller_reads_just_the_token_of_its_line(tmp_path: Path) -> None:
    assert read_token(_write(tmp_path, f"# mine\n{OPS} ops admin weight=3  # copied from the coordinator\n")) == OPS
    assert read_token(_write(tmp_path, f"{NODE_TOKEN} rack-1\n"), NODE) == NODE_TOKEN
    with pytest.raises(InvalidArgumentError, match="holds 2 tokens"):
        read_token(_write(tmp_path, f"{ALICE_1} alice\n{ALICE_2} alice\n"))


def test_the_same_token_twice_counts_once(tmp_path: Path) -> None:
    text = f"{ALICE_1} alice weight=2\n{ALICE_1} alice\n{PLAIN}\n{PLAIN}\n"
    tokens = _tokens(tmp_path, text)
    assert tokens.client == {ALICE_1, PLAIN} and tokens.options_of("alice").weight == 2.0
    assert read_token_file(_write(tmp_path, text)) == (ALICE_1, PLAIN)
    assert read_token(_write(tmp_path, f"{OPS} ops\n{OPS} ops admin\n")) == OPS


def test_rotation_lines_may_repeat_options_that_agree(tmp_path: Path) -> None:
    tokens = _tokens(tmp_path, f"{ALICE_1} alice weight=2 admin\n{ALICE_2} alice weight=2.0 max-slots=4\n")
    assert tokens.options_of("alice") == UserOptions(admin=True, weight=2.0, max_slots=4)


def test_options_without_a_user_belong_to_default(tmp_path: Path) -> None:
    tokens = _tokens(tmp_path, f"{PLAIN} admin weight=0.5\n{ALICE_1} default max-jobs=3\n")
    assert tokens.user_of(PLAIN) == tokens.user_of(ALICE_1) == DEFAULT_USER
    assert tokens.options_of(DEFAULT_USER) == UserOptions(admin=True, weight=0.5, max_jobs=3)


@pytest.mark.parametrize(("text", "line", "expected"), [
    (f"# ok\n{ALICE_1} alice\n{ALICE_2} al!ce\n", 3, "neither a user name"),
    (f"{ALICE_1} {'x' * 65}\n", 1, "neither a user name"),
    (f"{ALICE_1} alice weight=0\n", 1, "weight must be a positive number"),
    (f"{ALICE_1} alice weight=-1\n", 1, "weight must be a positive number"),
    (f"{ALICE_1} alice weight=nan\n", 1, "weight must be a positive number"),
    (f"{ALICE_1} alice weight=inf\n", 1, "weight must be a positive number"),
    (f"{ALICE_1} alice weight=two\n", 1, "weight must be a positive number"),
    (f"{ALICE_1} alice weight\n", 1, r"weight needs a value \(weight=W\)"),
    (f"{ALICE_1} alice max-jobs=1.5\n", 1, "max-jobs must be a whole number"),
    (f"{ALICE_1} alice max-jobs=-1\n", 1, "max-jobs must be a whole number"),
    (f"{ALICE_1} alice max-slots=4G\n", 1, "max-slots must be a whole number from 0"),
    (f"{ALICE_1} alice max-queued-shots=lots\n", 1, "max-queued-shots must be a whole number"),
    (f"{ALICE_1} alice weigth=2\n", 1, "field 3 is no option 'weigth'"),
    (f"{ALICE_1} alice admin=yes\n", 1, "admin takes no value"),
    (f"{ALICE_1} alice admin admin\n", 1, "admin is given twice"),
    (f"{ALICE_1} admin admin\n", 1, "a user may not be named admin"),
    (f"{ALICE_1} alice weight=1 weight=2\n", 1, "weight is given twice"),
    (f"{ALICE_1} alice bob\n", 1, "field 3 is no option 'bob'"),
    (f"{ALICE_1} alice {ALICE_2}\n", 1, r"field 3 is no option; the options are admin, weight=W"),
    (f"{ALICE_1} alice\n\n{ALICE_1} bob\n", 3, "this token is also on line 1 for user 'alice'"),
    (f"{ALICE_1} alice weight=2\n{ALICE_2} alice weight=3\n", 2,
     r"user 'alice' has weight=3 here but weight=2 on token file .*, line 1"),
    (f"{ALICE_1} alice weight=2\n{ALICE_1} alice weight=3\n", 2,
     r"user 'alice' has weight=3 here but weight=2 on token file .*, line 1"),
    (f"{ALICE_1} alice admin\n{ALICE_2} alice max-jobs=5\n{OPS} alice max-jobs=6\n", 3,
     "user 'alice' has max-jobs=6 here but max-jobs=5"),
    ("# fine\nabc123 alice\n", 2, "token too short"),
    ("tökenvalue-aaaaaaaaaaaaaaaaaa alice\n", 1, "printable ASCII"),
])
def test_bad_lines_say_where_and_never_show_a_token(tmp_path: Path, text: str, line: int, expected: str) -> None:
    message = _refused(tmp_path, text)
    assert f", line {line}:" in message, message
    assert re.search(expected, message), message


def test_a_file_without_tokens_is_refused(tmp_path: Path) -> None:
    assert "holds no token" in _refused(tmp_path, "# nothing yet\n\n")


def test_node_token_files_take_a_name_but_no_options(tmp_path: Path) -> None:
    entries = read_token_entries(_write(tmp_path, f"{NODE_TOKEN} rack-1   # the first rack\n"), NODE)
    assert [(e.user, dict(e.options)) for e in entries] == [("rack-1", {})]
    for option in ("admin", "weight=2", "max-slots=3"):
        message = _refused(tmp_path, f"{NODE_TOKEN} rack-1 {option}\n", NODE)
        assert "line 1: options" in message and "client tokens only" in message, message
    assert "client tokens only" in _refused(tmp_path, f"{NODE_TOKEN} admin\n", NODE)
    tokens = _tokens(tmp_path)
    assert tokens.user_of(NODE_TOKEN) is None and "rack-1" not in tokens.user_names()


def test_tokens_from_two_files_and_the_environment(tmp_path: Path) -> None:
    extra = _write(tmp_path, f"{ENV_TOKEN} carol max-jobs=7\n", "more.tokens")
    base = _write(tmp_path, CLIENT_FILE)
    tokens = Tokens.load(client_files=[base, extra, None], node_tokens=[NODE_TOKEN])
    assert tokens.user_of(ENV_TOKEN) == "carol" and tokens.user_of(ALICE_1) == "alice"

    # A token given by value belongs to the default user...
    tokens = Tokens.load(client_files=[base], node_tokens=[NODE_TOKEN], client_tokens=[ENV_TOKEN, None])
    assert tokens.user_of(ENV_TOKEN) == DEFAULT_USER
    tokens = Tokens.load(node_tokens=[NODE_TOKEN], client_tokens=[ENV_TOKEN])
    assert tokens.user_names() == (DEFAULT_USER,)
    # ...and may also be in a file, for that user only.
    tokens = Tokens.load(client_files=[base], node_tokens=[NODE_TOKEN], client_tokens=[PLAIN])
    assert tokens.user_of(PLAIN) == DEFAULT_USER
    with pytest.raises(InvalidArgumentError, match=r"given by value .* for user 'alice'") as info:
        Tokens.load(client_files=[base], node_tokens=[NODE_TOKEN], client_tokens=[ALICE_1])
    assert ALICE_1 not in str(info.value)

    # One user's options must agree across files too; one token belongs to one user.
    clash = _write(tmp_path, f"{ENV_TOKEN} alice weight=5\n", "clash.tokens")
    with pytest.raises(InvalidArgumentError, match=r"clash.tokens, line 1: user 'alice' has weight=5 here but "
                                                   r"weight=2 on token file .*client.tokens, line 2"):
        Tokens.load(client_files=[base, clash], node_tokens=[NODE_TOKEN])
    stolen = _write(tmp_path, f"{ALICE_1} mallory\n", "stolen.tokens")
    with pytest.raises(InvalidArgumentError, match=r"stolen.tokens, line 1: this token is also on .*client.tokens, "
                                                   r"line 2 for user 'alice'") as info:
        Tokens.load(client_files=[base, stolen], node_tokens=[NODE_TOKEN])
    assert ALICE_1 not in str(info.value)


def test_tokens_built_directly_check_their_users() -> None:
    tokens = Tokens(frozenset([NODE_TOKEN]), frozenset([ALICE_1, PLAIN]), {ALICE_1: "alice"},
                    {"alice": UserOptions(weight=3.0)})
    assert tokens.user_of(ALICE_1) == "alice" and tokens.user_of(PLAIN) == DEFAULT_USER
    with pytest.raises(InvalidArgumentError, match="no client token"):
        Tokens(frozenset([NODE_TOKEN]), frozenset([PLAIN]), {ALICE_1: "alice"})
    with pytest.raises(InvalidArgumentError, match="a user name is"):
        Tokens(frozenset([NODE_TOKEN]), frozenset([ALICE_1]), {ALICE_1: "no spaces please"})
    with pytest.raises(InvalidArgumentError, match="a user name is"):
        Tokens(frozenset([NODE_TOKEN]), frozenset([ALICE_1]), {ALICE_1: "admin"})


# ------------------------------------------------------------------ users and identities

def test_users_resolve_options_over_the_config_defaults(tmp_path: Path) -> None:
    config = CoordinatorConfig(max_jobs_per_user=20, max_queued_shots_per_user="10M", max_slots_per_user=8)
    users = Users.from_config(_tokens(tmp_path), config)
    assert users.authenticated
    assert users.get("alice") == User("alice", weight=2.0, admin=False, max_jobs=50, max_queued_shots=10 * 2**20,
                                      max_slots=8)
    assert users.get("ops") == User("ops", weight=1.0, admin=True, max_jobs=20, max_queued_shots=2**20, max_slots=0)
    assert users.get(DEFAULT_USER) == User(DEFAULT_USER, 1.0, False, 20, 10 * 2**20, 8)
    assert users.get("someone-gone") == User("someone-gone", 1.0, False, 20, 10 * 2**20, 8)
    assert [u.name for u in users.declared()] == ["alice", DEFAULT_USER, "ops"]
    assert users.declared()[0] is users.get("alice")
    assert not any(secret in repr(users) for secret in SECRETS)

    defaults = Users.from_config(_tokens(tmp_path), CoordinatorConfig())
    assert defaults.get("nobody") == User("nobody", max_jobs=1000)


def test_identify_from_grpc_metadata(tmp_path: Path) -> None:
    users = Users.from_config(_tokens(tmp_path), CoordinatorConfig())
    assert users.identify([("user-agent", "grpc"), ("authorization", f"Bearer {ALICE_2}")]) == Identity("alice", False)
    assert users.identify((("Authorization", f"bearer  {OPS} ".encode()),)) == Identity("ops", True)
    assert users.identify([("authorization", f"Bearer {PLAIN}")]) == Identity(DEFAULT_USER, False)
    for metadata in (None, [], [("authorization", f"Basic {ALICE_1}")], [("authorization", "Bearer ")],
                     [("authorization", f"Bearer {NODE_TOKEN}")], [("authorization", f"Bearer {ALICE_1}x")]):
        with pytest.raises(UnauthenticatedError) as info:
            users.identify(metadata)
        assert not any(secret in str(info.value) for secret in SECRETS)

    assert users.identify_token(OPS) == Identity("ops", True)
    assert users.identify_token(ALICE_1) == Identity("alice", False)
    assert users.identify_token(NODE_TOKEN) is None and users.identify_token(None) is None
    assert users.identify_token("") is None


def test_without_authentication_everyone_is_the_default_admin() -> None:
    users = Users.from_config(Tokens(), CoordinatorConfig(max_jobs_per_user=3))
    assert not users.authenticated and users.declared() == []
    everyone = Identity(DEFAULT_USER, True)
    assert users.identify(None) == users.identify([("authorization", "Bearer whatever-it-may-be-0000")]) == everyone
    assert users.identify_token(None) == users.identify_token("anything") == everyone
    assert users.get(DEFAULT_USER) == User(DEFAULT_USER, max_jobs=3)
