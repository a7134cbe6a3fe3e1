"""The config contract: keys, types, defaults, bounds, flags over the file, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.programs import TWISTD, VIRBY, VIRBYD
from virby.config import KEYS, KEYS_BY_NAME, Config, ConfigError, fromMapping, load, parseSize
from virby.flags import collect

GIB = 1024**3


def test_defaults_are_the_ones_the_readme_states() -> None:
    config = fromMapping({})
    assert config == Config()
    assert config.cores == 8
    assert config.memory == 6144
    assert config.disk_size == 100 * GIB
    assert config.port == 31222
    assert config.listen == "launchd:name=Listener"
    assert config.ttl == 10800
    assert config.working_directory == "/var/lib/virby"
    assert config.leases_file == "/var/db/dhcpd_leases"
    assert config.guest_ssh_port == 22
    assert config.start_timeout == 180
    assert config.shared_dirs == {}
    assert not (config.on_demand or config.rosetta or config.debug or config.allow_user_ssh)
    assert not config.ephemeral


def test_every_key_round_trips_from_a_full_document() -> None:
    document = {
        "cores": 4,
        "memory": 8192,
        "disk-size": "200GiB",
        "port": 40000,
        "listen": "tcp:40000:interface=127.0.0.1",
        "on-demand": True,
        "ttl": 60,
        "rosetta": True,
        "nested-virtualization": True,
        "shared-dirs": {"src": "/Users/me/src"},
        "debug": True,
        "allow-user-ssh": True,
        "working-directory": "/tmp/virby",
        "image": "/nix/store/abc-image/nixos.img",
        "vfkit": "/nix/store/xyz-vfkit/bin/vfkit",
        "leases-file": "/tmp/leases",
        "guest-ssh-port": 2222,
        "start-timeout": 30,
        "ephemeral": True,
    }
    assert set(document) == set(KEYS_BY_NAME)
    config = fromMapping(document)
    assert config.disk_size == 200 * GIB
    assert config.shared_dirs == {"src": "/Users/me/src"}
    assert config.on_demand and config.nested_virtualization and config.ephemeral
    assert config.path("diff.img") == "/tmp/virby/diff.img"


@pytest.mark.parametrize(
    ("document", "key", "words"),
    [
        ({"cores": 0}, "cores", "between 1 and 256"),
        ({"cores": True}, "cores", "a boolean"),
        ({"cores": "8"}, "cores", "a string"),
        ({"memory": 512}, "memory", "between 1024 and 1048576"),
        ({"port": 80}, "port", "between 1024 and 65535"),
        ({"port": 70000}, "port", "between 1024 and 65535"),
        ({"disk-size": "100GB"}, "disk-size", "ambiguous"),
        ({"disk-size": "lots"}, "disk-size", "size like"),
        ({"disk-size": 100}, "disk-size", "size like"),
        ({"disk-size": "1MiB"}, "disk-size", "between 1GiB and 64TiB"),
        ({"on-demand": "yes"}, "on-demand", "true or false"),
        ({"ephemeral": 1}, "ephemeral", "true or false"),
        ({"ttl": 0}, "ttl", "between 1 and 31536000"),
        ({"working-directory": "var/lib/virby"}, "working-directory", "absolute"),
        ({"working-directory": "/a," + "b"}, "working-directory", "','"),
        ({"working-directory": "/" + "x" * 100}, "working-directory", "103 bytes"),
        ({"shared-dirs": ["/x"]}, "shared-dirs", "object"),
        ({"shared-dirs": {"a b": "/x"}}, "shared-dirs", "letters"),
        ({"shared-dirs": {"sshd-keys": "/x"}}, "shared-dirs", "reserved"),
        ({"shared-dirs": {"src": "relative"}}, "shared-dirs", "absolute"),
        ({"listen": ""}, "listen", "non-empty"),
        ({"image": 3}, "image", "non-empty string"),
        ({"guest-ssh-port": 0}, "guest-ssh-port", "between 1 and 65535"),
        ({"surprise": 1}, "surprise", "unknown key"),
    ],
)
def test_mistakes_name_the_key(document: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        fromMapping(document)
    assert caught.value.key == key
    message = str(caught.value)
    assert key in message and words in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100GiB", 100 * GIB),
        ("100G", 100 * GIB),
        ("512MiB", 512 * 1024**2),
        ("4096", 4096),
        ("1TiB", 1024 * GIB),
        (" 2 GiB ", 2 * GIB),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parseSize(text) == size


@pytest.mark.parametrize("text", ["6TB", "x", "", "1.5GiB", "-1G", "GiB", "10iB"])
def test_sizes_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parseSize(text)


def test_flags_win_over_the_file(tmp_path) -> None:
    path = tmp_path / "virby.json"
    path.write_text(json.dumps({"cores": 2, "debug": True, "shared-dirs": {"a": "/a"}}))
    config = load(
        str(path),
        {"cores": "6", "debug": False, "memory": "8GiB", "shared-dirs": ["b=/b"], "ttl": None},
    )
    assert config.cores == 6
    assert config.debug is False
    assert config.memory == 8192
    assert config.shared_dirs == {"b": "/b"}


def test_flag_values_are_checked_like_the_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, {"cores": "many"})
    assert caught.value.key == "cores"
    with pytest.raises(ConfigError) as caught:
        load(None, {"shared-dirs": ["nodir"]})
    assert caught.value.key == "shared-dirs"


@pytest.mark.parametrize(
    ("content", "words"),
    [("{", "not valid JSON"), ("[1]", "JSON object"), (b"\xff\xfe", "UTF-8")],
)
def test_bad_files(tmp_path, content, words) -> None:
    path = tmp_path / "virby.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=words):
        load(str(path))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"cannot read /nonexistent/virby\.json"):
        load("/nonexistent/virby.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
known_or_not = st.sampled_from([key.name for key in KEYS]) | st.text(max_size=12)


@given(st.dictionaries(known_or_not, json_values, max_size=6) | json_values)
def test_any_document_loads_or_names_a_key(document: object) -> None:
    try:
        config = fromMapping(document)
    except ConfigError as e:
        if isinstance(document, dict):
            assert e.key in document
        assert "\n" not in str(e)
    else:
        assert isinstance(config, Config)


@given(st.sampled_from(KEYS), json_values)
def test_any_value_for_a_key_loads_or_names_it(key, value) -> None:
    try:
        fromMapping({key.name: value})
    except ConfigError as e:
        assert e.key == key.name


def test_command_line_error_is_one_line_without_traceback(tmp_path) -> None:
    path = tmp_path / "virby.json"
    path.write_text(json.dumps({"memory": "lots"}))
    result = subprocess.run(
        [sys.executable, "-m", "virby.cli", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "virby status: error: config key 'memory': 'lots' is not a size like '100GiB'"
    ]


# -- bounds: nothing a file or a flag says can fail later, in the reactor, the OS or vfkit

HUGE = 10**400


@pytest.mark.parametrize(
    ("document", "key", "words"),
    [
        ({"ttl": HUGE}, "ttl", "between 1 and 31536000, got a larger number"),
        ({"start-timeout": HUGE}, "start-timeout", "between 1 and 3600"),
        ({"start-timeout": 3601}, "start-timeout", "between 1 and 3600"),
        ({"cores": 100000}, "cores", "between 1 and 256"),
        ({"memory": "99999999999999999999TiB"}, "memory", "between 1024 and 1048576"),
        ({"memory": "999999999999999999999999TiB"}, "memory", "far too large"),
        ({"memory": "9999999999TiB"}, "memory", "between 1024 and 1048576"),
        ({"memory": 10**12}, "memory", "between 1024 and 1048576"),
        ({"disk-size": "100000TiB"}, "disk-size", "between 1GiB and 64TiB"),
        ({"working-directory": "/var/lib/vir\x00by"}, "working-directory", "control character"),
        ({"image": "/nix/store/x\x00.img"}, "image", "control character"),
        ({"leases-file": "/var/db/\x00"}, "leases-file", "control character"),
        ({"vfkit": "vf\x00kit"}, "vfkit", "control character"),
        ({"listen": "tcp:1\x00"}, "listen", "control character"),
        ({"working-directory": "/var/lib/virby\n"}, "working-directory", "control character"),
        ({"image": "/x/\ud800.img"}, "image", "not valid UTF-8"),
        ({"image": "/" + "x" * 1100}, "image", "at most 1023"),
        ({"shared-dirs": {"src\n": "/x"}}, "shared-dirs", "must be letters"),
        ({"shared-dirs": {"a" * 36: "/x"}}, "shared-dirs", "at most 35"),
        ({"shared-dirs": {"src": "/x\x00"}}, "shared-dirs", "control character"),
        ({"shared-dirs": {f"t{i}": "/x" for i in range(65)}}, "shared-dirs", "at most 64"),
    ],
)
def test_every_key_is_bounded(document: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        fromMapping(document)
    assert caught.value.key == key
    message = str(caught.value)
    assert words in message, message
    assert "\n" not in message and len(message) < 400


def test_a_share_tag_of_35_bytes_is_the_longest_allowed() -> None:
    assert fromMapping({"shared-dirs": {"a" * 35: "/x"}}).shared_dirs == {"a" * 35: "/x"}


def write(tmp_path, text: str):
    path = tmp_path / "virby.json"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[" * 100_000, None, "nests more than 32 levels"),
        ('{"cores": ' + "[" * 100_000, "cores", "nests more than 32 levels"),
        ('{"shared-dirs": {"a": ' + "{" * 5000 + "}" * 5000 + "}}", "shared-dirs", "nests"),
        ('{"ttl": ' + "9" * 5000 + "}", "ttl", "a 5000-digit number"),
        ('{"cores": -' + "9" * 5000 + "}", "cores", "a 5000-digit number"),
        ('{"shared-dirs": {"a": ' + "1" * 5000 + "}}", "shared-dirs", "a 5000-digit number"),
        ('{"cores": 1e999999}', "cores", "a number (Infinity)"),
        ('{"cores": [' + "1" * 5000 + "]}", "cores", "got a list"),
        ('{"cores": "unterminated', "cores", "not valid JSON"),
        ('{"cores": [1, 2,, 3], "ttl": 1}', "cores", "not valid JSON"),
        ('{"cores": 1, "ttl": }', "ttl", "not valid JSON"),
        ('{"cores": 1,, "ttl": 1}', None, "not valid JSON"),
        ('"' + "x" * 200_000, None, "not valid JSON"),
    ],
)
def test_files_that_would_break_the_decoder_name_the_key(tmp_path, text, key, words) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text))
    assert caught.value.key == key
    message = str(caught.value)
    assert words in message and "\n" not in message and len(message) < 600, message


def test_a_config_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path) -> None:
    fifo = tmp_path / "virby.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load(str(fifo))


@pytest.mark.parametrize(
    ("flags", "key", "words"),
    [
        ({"ttl": "9" * 5000}, "ttl", "a 5000-digit number"),
        ({"cores": "١٢"}, "cores", "expected an integer"),
        ({"cores": "x" * 5000}, "cores", "expected an integer, got 'xxx"),
        ({"memory": "9" * 5000}, "memory", "a 5000-digit number"),
        ({"memory": "9" * 5000 + "GiB"}, "memory", "far too large"),
        ({"start-timeout": str(HUGE)}, "start-timeout", "between 1 and 3600"),
        ({"shared-dirs": ['{"a": ' + "[" * 100_000]}, "shared-dirs", "nests more than"),
        ({"shared-dirs": ['{"a": ' + "7" * 5000 + "}"]}, "shared-dirs", "5000-digit"),
        ({"shared-dirs": ["src\n=/x"]}, "shared-dirs", "must be letters"),
        ({"working-directory": "/tmp/\x00"}, "working-directory", "control character"),
    ],
)
def test_flags_are_bounded_like_the_file(flags, key, words) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, flags)
    assert caught.value.key == key
    message = str(caught.value)
    assert words in message and "\n" not in message and len(message) < 400, message


# -- the three commands: every loader path ends in one line, never a traceback

COMMANDS = ["status", "prepare", "twistd"]


def run_command(command: str, config_path: str | None, flags: list[str]) -> tuple[int, str]:
    """Load the config the way C{command} does (file and flags), without running it."""
    argv = (["--config", config_path] if config_path else []) + flags
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        if command == "twistd":
            from twisted.python import usage

            from virby.daemon import tap

            options = tap.Options()
            try:
                options.parseOptions(argv)
                tap.loadConfig(options)
                code = 0
            except usage.UsageError as e:  # twistd prints these itself, as one line
                stderr.write(f"twistd virby: {e}\n")
                code = 2
            except SystemExit as e:
                code = int(e.code or 0)
        else:
            from virby import cli

            with mock.patch.object(cli, "_run", return_value=0):
                code = cli.main([command, *argv])
    return code, stderr.getvalue()


def assert_one_line_or_loaded(code: int, stderr: str, key: str | None) -> None:
    if code == 0:
        assert stderr == ""
        return
    lines = stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 600, stderr[:2000]
    if key is not None and "config" in lines[0]:
        assert repr(key)[:20].rstrip("'") in lines[0], lines[0]


def json_text_values() -> st.SearchStrategy[str]:
    """JSON texts of values, including what once broke the loader: deep nesting, huge
    integers and NUL bytes."""
    scalars = st.one_of(
        json_values.map(json.dumps),
        st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
        st.integers(min_value=1, max_value=6000).map(lambda n: "-" + "1" * n),
        st.text().map(lambda t: json.dumps("/" + t + "\x00" + t)),
        st.sampled_from(['"/tmp/\\u0000"', '"src\\n"', '"\\ud800"', "1e999999", "NaN"]),
    )
    nested = st.tuples(st.integers(min_value=1, max_value=120_000), st.booleans()).map(
        lambda t: ("[" * t[0] + "]" * t[0]) if t[1] else ("[" * t[0])
    )
    return st.one_of(scalars, nested)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(COMMANDS), known_or_not, json_text_values())
def test_any_file_loads_or_is_one_line_in_every_command(command, name, value) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "virby.json")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write("{" + json.dumps(name) + ": " + value + "}")
        code, stderr = run_command(command, path, [])
    assert_one_line_or_loaded(code, stderr, name)


flag_texts = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.text(max_size=10).map(lambda t: t + "\x00" + t),
    st.integers(min_value=1, max_value=120_000).map(lambda n: "{" + '"a":' + "[" * n),
    st.sampled_from(["src\n=/x", "a" * 37 + "=/x", "99999999999999999999TiB", "1" + "0" * 400]),
)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(COMMANDS),
    st.sampled_from([k for k in KEYS if k.value.form != "switch"]),
    flag_texts,
)
def test_any_flag_loads_or_is_one_line_in_every_command(command, key, text) -> None:
    # The --KEY=VALUE form: "--cores -:" is an argument parser's usage error, not a value.
    code, stderr = run_command(command, None, [f"--{key.name}={text}"])
    assert_one_line_or_loaded(code, stderr, key.name)


def commandLine(command: str, path: str) -> list[str]:
    if command == "twistd":
        return [*TWISTD, "--nodaemon", "--pidfile=", "virby", "--config", path]
    return [*VIRBY, command, "--config", path]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000, "nests more than 32 levels"),
        ('{"ttl": ' + "9" * 5000 + "}", "config key 'ttl'"),
        ('{"memory": "99999999999999999999TiB"}', "config key 'memory'"),
        ('{"image": "/nix/store/x\\u0000.img"}', "config key 'image'"),
        ('{"shared-dirs": {"src\\n": "/x"}}', "config key 'shared-dirs'"),
    ],
    ids=["nested", "5000-digits", "huge-memory", "nul-in-path", "tag-newline"],
)
def test_each_command_says_one_line(tmp_path, command, text, words) -> None:
    path = write(tmp_path, text)
    result = subprocess.run(
        commandLine(command, path), capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("listen", "port"),
    [
        ("tcp:40000:interface=127.0.0.1", 40000),
        ("tcp:port=40001:interface=127.0.0.1", 40001),
        ("tcp:interface=127.0.0.1:port=40002", 40002),
        ("tcp6:40003:interface=\\:\\:1", 40003),
        ("tcp:0:interface=127.0.0.1", 31222),
        ("systemd:domain=INET:index=0", 31222),
        ("launchd:name=Listener", 31222),
        ("unix:/tmp/x.sock", 31222),
    ],
)
def test_a_tcp_listen_string_names_the_builder_port(listen: str, port: int) -> None:
    assert fromMapping({"listen": listen, "port": 31222}).builderPort == port


def flag_text(key, value) -> object:
    """What the command line gives for C{value}: a word, a switch's boolean, a list of items."""
    if key.value.form == "switch":
        return value
    if key.value.form == "repeated":
        return [f"{tag}={path}" for tag, path in value.items()]
    return str(value)


@pytest.mark.parametrize("key", KEYS, ids=lambda key: key.name)
def test_every_key_reads_a_value_from_the_command_line_as_from_the_file(key) -> None:
    value = key.default if key.default is not None else "/nix/store/0000-image/nixos.img"
    from_file = fromMapping({key.name: value})
    assert load(None, {key.name: flag_text(key, value)}) == from_file


# -- input that once slipped through, or through as a traceback


@pytest.mark.parametrize("command", [*COMMANDS, "virbyd"])
def test_a_directory_given_as_the_config_is_one_line(tmp_path, command) -> None:
    argv = (
        [*VIRBYD, "--config", str(tmp_path)]
        if command == "virbyd"
        else commandLine(command, str(tmp_path))
    )
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    program = {"twistd": "twistd virby", "virbyd": "virbyd"}.get(command, f"virby {command}")
    assert result.stderr.strip().splitlines() == [
        f"{program}: error: config: {tmp_path} is a directory: give the JSON config file in it"
    ]


@pytest.mark.parametrize("key", [k for k in KEYS if k.value.form != "switch"])
def test_an_empty_flag_is_refused_by_its_key_not_taken_as_unset(key) -> None:
    """C{--working-directory "$UNSET"} must not quietly mean the default."""
    with pytest.raises(ConfigError) as caught:
        load(None, collect({key.name: [""] if key.value.form == "repeated" else ""}.get))
    assert caught.value.key == key.name


def test_an_empty_flag_in_each_command_line_is_refused() -> None:
    twistd = [*TWISTD, "--nodaemon", "--pidfile=", "virby", "--working-directory="]
    for argv in ([*VIRBY, "prepare", "--working-directory", ""], twistd):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert "config key 'working-directory': expected a non-empty string" in result.stderr


@pytest.mark.parametrize(
    ("items", "words"),
    [
        (["a=/x", "a=/y"], "tag 'a' is given twice"),
        (['{"a": "/x"}', "a=/y"], "tag 'a' is given twice"),
        (['{"a": "/x", "a": "/y"}'], "names 'a' twice"),
    ],
)
def test_a_share_tag_given_twice_on_the_command_line_is_refused(items, words) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, {"shared-dirs": items})
    assert caught.value.key == "shared-dirs" and words in str(caught.value)


@pytest.mark.parametrize(
    "text",
    ['{"shared-dirs": {"a": "/x", "a": "/y"}}', '{"ttl": 5, "ttl": 6}'],
)
def test_a_key_given_twice_in_the_file_is_refused(tmp_path, text) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"names '(a|ttl)' twice: keep one$"):
        load(path)


def test_the_flags_shares_replace_the_files(tmp_path) -> None:
    path = write(tmp_path, json.dumps({"shared-dirs": {"a": "/x", "b": "/y"}}))
    assert load(path, {"shared-dirs": ["a=/z"]}).shared_dirs == {"a": "/z"}


def test_a_port_a_tcp_listen_contradicts_is_warned_about(tmp_path) -> None:
    warnings: list[str] = []
    config = load(None, {"port": "5000", "listen": "tcp:4000"}, warn=warnings.append)
    assert config.builderPort == 4000
    assert warnings == [
        "port 5000 is ignored: listen 'tcp:4000' names port 4000, where the daemon accepts; "
        "set one of them to match the other"
    ]
    for quiet in ({"port": "4000", "listen": "tcp:4000"}, {"listen": "tcp:4000"},
                  {"port": "5000", "listen": "launchd:name=Listener"}):  # fmt: skip
        load(None, quiet, warn=warnings.append)
    assert len(warnings) == 1


def test_the_commands_warn_of_an_ignored_port_on_stderr() -> None:
    result = subprocess.run(
        [*VIRBY, "status", "--listen", "tcp:4000", "--port", "5000",
         "--working-directory", "/nonexistent/virby"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stderr.splitlines()[0] == (
        "virby status: warning: port 5000 is ignored: listen 'tcp:4000' names port 4000, "
        "where the daemon accepts; set one of them to match the other"
    )


@pytest.mark.parametrize("command", ["status", "doctor"])
def test_json_is_one_document_even_when_the_config_is_corrupt(tmp_path, command) -> None:
    path = write(tmp_path, '{"ttl": ')
    result = subprocess.run(
        [*VIRBY, command, "--json", "--config", path], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["error"].startswith("config")
    assert len(result.stderr.splitlines()) == 1
    if command == "status":
        assert document["state"] == "unknown" and document["reason"] == document["error"]
