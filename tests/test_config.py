"""Configuration: types, defaults, overrides, and error messages that name the key."""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from gatewayd.core.config import ConfigErrors, load_config
from gatewayd.core.schema import Address, ConfigError
from tests import plugin_everything


def errors_of(text="", overrides=(), schemas=None):
    with pytest.raises(ConfigErrors) as info:
        load_config(None, list(overrides), schemas or {}, text=text)
    return [str(e) for e in info.value.errors]


def test_defaults_make_a_working_config():
    config = load_config(None, [], {}, text="")
    assert config.http.listen == Address("127.0.0.1", 8080)
    assert config.gateway.data_dir == "var"
    assert config.mqtt.broker == "managed"
    assert config.storage.synchronous == "normal"


def test_the_shipped_gatewayd_toml_is_valid():
    config = load_config("gatewayd.toml", [], {"paku": None, "edgesentinel": None, "streetlight": None,
                                               "thingsnxt": None, "kaiabc": None})
    assert config.data_dir.name == "var"
    assert config.data_dir.is_absolute()


def test_bad_listen_names_the_key():
    assert errors_of(overrides=["http.listen=x"]) == ["http.listen: expected HOST:PORT, got 'x'"]


@pytest.mark.parametrize("value,expected", [
    ("'0.0.0.0:1883'", Address("0.0.0.0", 1883)),
    ("'[::1]:8080'", Address("::1", 8080)),
    ("'localhost:0'", Address("localhost", 0)),
])
def test_listen_forms(value, expected):
    assert load_config(None, [f"http.listen={value}"], {}, text="").http.listen == expected


def test_port_out_of_range():
    assert errors_of(overrides=["http.listen='a:70000'"]) == ["http.listen: port must be 0-65535, got 70000"]


def test_unknown_key_suggests_the_right_one():
    assert errors_of("[http]\nlisen = 'a:1'\n") == ["http.lisen: unknown key (did you mean 'listen'?)"]


def test_unknown_section_suggests_the_right_one():
    assert errors_of("[storag]\n") == ["storag: unknown section (did you mean 'storage'?)"]


def test_a_secret_in_the_file_points_to_the_env_key():
    (error,) = errors_of("[http]\nadmin_token = 'hunter2'\n")
    assert error.startswith("http.admin_token: secrets are never written in the file; set admin_token_env")
    assert "hunter2" not in error


def test_env_key_must_be_a_variable_name():
    assert errors_of("[http]\nadmin_token_env = 'not a name'\n") == [
        "http.admin_token_env: expected an environment variable name, got 'not a name'"
    ]


def test_wrong_types_are_described():
    assert errors_of("[http]\nmax_body_bytes = '10MB'\n") == [
        "http.max_body_bytes: expected an integer, got '10MB' (string)"
    ]
    assert errors_of("[storage]\nsynchronous = 'fast'\n") == [
        "storage.synchronous: expected one of 'normal', 'full', got 'fast' (string)"
    ]
    assert errors_of("[http]\naccess_log = 1\n") == ["http.access_log: expected true or false, got 1 (integer)"]


def test_all_errors_are_reported_at_once():
    errors = errors_of("[http]\nlisten = 'x'\nmax_body_bytes = 10\n[log]\nlevel = 'loud'\n")
    # A mistyped key no longer hides the section's range checks on the keys that parsed.
    assert errors == ["http.listen: expected HOST:PORT, got 'x'", "http.max_body_bytes: must be at least 1024, got 10",
                      "log.level: expected one of 'debug', 'info', 'warning', 'error', got 'loud' (string)"]


def test_an_unknown_key_does_not_hide_the_sections_other_errors():
    errors = errors_of("[backup]\nkepp = 3\ninterval_s = 5\nkeep = 0\n")
    assert errors == ["backup.kepp: unknown key (did you mean 'keep'?)",
                      "backup.interval_s: must be 0 (off) or 60 .. 2592000 seconds, got 5.0",
                      "backup.keep: must be 1 .. 1000, got 0"]
    # Cross-key checks run over what parsed; one about the mistyped key itself is left out.
    errors = errors_of("[tls]\nmqtt_listen = 'nope'\nmqtt_plain = false\nwarn_days = 0\n")
    assert errors == ["tls.mqtt_listen: expected HOST:PORT, got 'nope'",
                      "tls.mqtt_plain: false needs tls.mqtt_listen (devices would have no MQTT listener)",
                      "tls.warn_days: must be 1 .. 365, got 0"]


def test_range_check_names_the_key():
    assert errors_of("[http]\nmax_body_bytes = 10\n") == ["http.max_body_bytes: must be at least 1024, got 10"]


def test_http_backlog_is_a_checked_key():
    assert load_config(None, [], {}, text="[http]\nbacklog = 4096\n").http.backlog == 4096
    assert errors_of("[http]\nbacklog = 0\n") == ["http.backlog: must be 1 .. 65535 connections, got 0"]
    assert errors_of("[http]\nbacklog = 70000\n") == ["http.backlog: must be 1 .. 65535 connections, got 70000"]
    assert errors_of("[http]\nbacklog = 'many'\n") == ["http.backlog: expected an integer, got 'many' (string)"]


def test_set_overrides_parse_toml_values():
    config = load_config(None, ["storage.group_commit_max=5", "http.access_log=false", "gateway.id=site-7"], {}, text="")
    assert config.storage.group_commit_max == 5
    assert config.http.access_log is False
    assert config.gateway.id == "site-7"


def test_set_without_equals_is_an_error():
    assert errors_of(overrides=["http.listen"]) == ["--set: expected dotted.key=value, got 'http.listen'"]


def test_set_under_a_value_is_an_error():
    assert errors_of("[http]\nlisten = 'a:1'\n", overrides=["http.listen.port=1"]) == [
        "http.listen: is a value, not a table; cannot set a key under it"
    ]


def test_invalid_toml_says_where():
    (error,) = errors_of("[http\n")
    assert "invalid TOML" in error and "line 1" in error


schemas = {"everything": plugin_everything.EverythingConfig, "bare": None}


def test_plugin_options_are_validated_by_the_plugin_schema():
    config = load_config(None, [], schemas, text="[plugins.everything]\ngreeting = 'hi'\n")
    assert config.plugins["everything"].options.greeting == "hi"
    assert config.plugins["everything"].mount == "/everything"
    assert config.plugins["bare"].enabled  # installed plugins are enabled by default
    assert errors_of("[plugins.everything]\ngreting = 'hi'\n", schemas=schemas) == [
        "plugins.everything.greting: unknown key (did you mean 'greeting'?)"
    ]
    assert errors_of("[plugins.everything]\nthreshold = -1\n", schemas=schemas) == [
        "plugins.everything.threshold: must be >= 0, got -1"
    ]


def test_plugin_common_keys():
    config = load_config(None, [], schemas, text="[plugins.bare]\nenabled = false\nmount = '/b'\nlisten = '127.0.0.1:0'\n")
    bare = config.plugins["bare"]
    assert (bare.enabled, bare.mount, bare.listen) == (False, "/b", Address("127.0.0.1", 0))
    assert errors_of("[plugins.bare]\nmount = 'b'\n", schemas=schemas) == [
        "plugins.bare.mount: expected a path like '/bare', got 'b'"
    ]
    assert errors_of("[plugins.bare]\ncolour = 1\n", schemas=schemas) == [
        "plugins.bare.colour: unknown key (this plugin has no options)"
    ]


def test_unknown_plugin_is_an_error_with_a_suggestion():
    assert errors_of("[plugins.everythin]\n", schemas=schemas) == [
        "plugins.everythin: no plugin named 'everythin' is installed (did you mean 'everything'?)"
    ]


def test_nested_sections_and_lists():
    @dataclass
    class Inner:
        port: int = 1

    @dataclass
    class Outer:
        inner: list[Inner] | None = None

    assert errors_of("[plugins.nested]\ninner = [{port = 1}, {port = 'x'}]\n", schemas={"nested": Outer}) == [
        "plugins.nested.inner[1].port: expected an integer, got 'x' (string)"
    ]


def test_validate_hook_errors_carry_the_section():
    @dataclass
    class S:
        low: int = 0
        high: int = 1

        def validate(self):
            if self.low > self.high:
                raise ConfigError("low", "must not exceed high")

    assert errors_of("[plugins.s]\nlow = 5\n", schemas={"s": S}) == ["plugins.s.low: must not exceed high"]


def test_check_config_exits_2_naming_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", "--set", "http.listen=x"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "http.listen: expected HOST:PORT, got 'x'" in result.stderr


def test_check_config_accepts_options_before_and_after_the_command(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("[gateway]\nid = 'from-file'\n")
    for argv in (["--config", str(path), "check-config"], ["check-config", "--config", str(path)]):
        result = subprocess.run([sys.executable, "-m", "gatewayd", *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "from-file" in result.stdout


@pytest.mark.parametrize("value,expected", [
    ("http://192.168.1.10:8080", "http://192.168.1.10:8080"),
    ("https://gw.site.example/", "https://gw.site.example"),
    ("http://[fd00::10]:8080/gateway/", "http://[fd00::10]:8080/gateway"),
])
def test_public_url_is_a_base_url_without_a_trailing_slash(value, expected):
    assert load_config(None, [f"http.public_url='{value}'"], {}, text="").http.public_url == expected
    assert load_config(None, [], {}, text="").http.public_url == ""  # derived from http.listen


@pytest.mark.parametrize("value", ["192.168.1.10:8080", "ftp://gw", "http://", "http://gw:99999", "http://gw/?a=1",
                                   "http://gw/#x", "http://user:pw@gw", "http://gw/a b", "http://gw/\n"])
def test_a_bad_public_url_names_the_key(value):
    (error,) = errors_of(overrides=[f"http.public_url={json.dumps(value)}"])
    assert error.startswith("http.public_url: expected http(s)://HOST[:PORT][/PATH]"), error


@pytest.mark.parametrize("setting, message", [
    ("devices.command_ttl_s=inf", "devices.command_ttl_s: expected a finite number, got inf"),
    ("gateway.shutdown_grace_s=nan", "gateway.shutdown_grace_s: expected a finite number, got nan"),
    ("devices.claim_code_ttl_s=1e12", "devices.claim_code_ttl_s: must be at most 315360000 (10 years), got 1000000000000.0"),
])
def test_numbers_no_setting_can_mean_are_refused_naming_the_key(setting, message):
    with pytest.raises(ConfigErrors) as info:
        load_config(None, [setting], {}, text="")
    assert [str(e) for e in info.value.errors] == [message]


@pytest.mark.parametrize("value", ["0", "0.5", "3601", "-1"])
def test_a_bad_mqtt_stall_timeout_names_the_key(value):
    assert errors_of(overrides=[f"mqtt.stall_timeout_s={value}"]) == [
        f"mqtt.stall_timeout_s: must be 1 .. 3600 (seconds a device may read nothing of what waits for it "
        f"before it is closed), got {float(value)}"]


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_stall_timeout_that_is_not_finite_names_the_key(value):
    assert errors_of(overrides=[f"mqtt.stall_timeout_s={value}"]) == [
        f"mqtt.stall_timeout_s: expected a finite number, got {value}"]


def test_a_stall_timeout_that_is_not_a_number_names_the_key():
    [error] = errors_of(text='[mqtt]\nstall_timeout_s = "a minute"\n')
    assert error.startswith("mqtt.stall_timeout_s:")


def test_the_mqtt_stall_timeout_is_read():
    assert load_config(None, [], {}, text="").mqtt.stall_timeout_s == 60.0
    assert load_config(None, ["mqtt.stall_timeout_s=5"], {}, text="").mqtt.stall_timeout_s == 5.0
