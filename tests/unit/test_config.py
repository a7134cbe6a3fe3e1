"""The config contract: keys, types, defaults, bounds, flags over the file, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virby.config import KEYS, KEYS_BY_NAME, Config, ConfigError, from_mapping, load, parse_size

GIB = 1024**3


def test_defaults_match_the_design() -> None:
    config = from_mapping({})
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
    config = from_mapping(document)
    assert config.disk_size == 200 * GIB
    assert config.shared_dirs == {"src": "/Users/me/src"}
    assert config.on_demand and config.nested_virtualization and config.ephemeral
    assert config.path("diff.img") == "/tmp/virby/diff.img"


@pytest.mark.parametrize(
    ("document", "key", "words"),
    [
        ({"cores": 0}, "cores", "at least 1"),
        ({"cores": True}, "cores", "a boolean"),
        ({"cores": "8"}, "cores", "a string"),
        ({"memory": 512}, "memory", "at least 1024"),
        ({"port": 80}, "port", "between 1024 and 65535"),
        ({"port": 70000}, "port", "between 1024 and 65535"),
        ({"disk-size": "100GB"}, "disk-size", "ambiguous"),
        ({"disk-size": "lots"}, "disk-size", "size like"),
        ({"disk-size": 100}, "disk-size", "size like"),
        ({"disk-size": "1MiB"}, "disk-size", "at least 1GiB"),
        ({"on-demand": "yes"}, "on-demand", "true or false"),
        ({"ephemeral": 1}, "ephemeral", "true or false"),
        ({"ttl": 0}, "ttl", "at least 1"),
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
        from_mapping(document)
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
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["6TB", "x", "", "1.5GiB", "-1G", "GiB", "10iB"])
def test_sizes_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


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
        config = from_mapping(document)
    except ConfigError as e:
        if isinstance(document, dict):
            assert e.key in document
        assert "\n" not in str(e)
    else:
        assert isinstance(config, Config)


@given(st.sampled_from(KEYS), json_values)
def test_any_value_for_a_key_loads_or_names_it(key, value) -> None:
    try:
        from_mapping({key.name: value})
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
