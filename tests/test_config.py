"""Strict configuration: every deploy file loads, unknown keys and literal secrets are named errors."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from stream.config import ConfigError, load_config, parse_config

DEPLOY = sorted((ROOT / "deploy").glob("*.toml"))


@pytest.mark.parametrize("path", DEPLOY, ids=[p.name for p in DEPLOY])
def test_every_deploy_config_loads(path, monkeypatch):
    monkeypatch.setenv("VIGIL_KAFKA_USERNAME", "user")
    monkeypatch.setenv("VIGIL_KAFKA_PASSWORD", "s3cret")
    monkeypatch.setenv("VIGIL_OUTPUT_KAFKA_USERNAME", "us")
    monkeypatch.setenv("VIGIL_OUTPUT_KAFKA_PASSWORD", "0urs")
    cfg = load_config(path)
    assert cfg.source.topics and cfg.output.annotations_topic
    if "sasl.password" in cfg.source.kafka:
        assert cfg.source.kafka["sasl.password"] == "s3cret"  # resolved from the environment


def test_there_are_deploy_configs():
    assert {"demo.toml", "local.toml", "rubin.toml", "ztf.toml"} <= {p.name for p in DEPLOY}


def test_a_config_path_that_cannot_be_read_is_one_clear_line(tmp_path, capsys):
    from stream.cli import main

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[source]\xff\xfe")
    for path, why in ((tmp_path / "missing.toml", "cannot be read (No such file"),
                      (tmp_path, "cannot be read (Is a directory"), (binary, "not UTF-8 text (byte 8)")):
        with pytest.raises(ConfigError, match=re.escape(f"config {path}: {why}")):
            load_config(path)
        assert main(["run", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vigil: error: config {path}: {why}") and err.count("\n") == 1


@pytest.mark.parametrize("data, key", [
    ({"source": {"bootstrap_server": "x"}}, "source.bootstrap_server: unknown key"),
    ({"sources": {}}, "sources: unknown section"),
    ({"output": {"queue": "x"}}, "output.queue: unknown key"),
    ({"source": {"batch_size": "10"}}, "source.batch_size: expected a whole number, not '10'"),
    ({"source": {"topics": "t"}}, "source.topics: expected a list of strings"),
    ({"source": {"kafka": {"sasl.password": "literal"}}}, "source.kafka.sasl.password: secrets must come from"),
    ({"source": {"kafka": {"sasl.password": {"env": "VIGIL_NOT_SET_ANYWHERE"}}}},
     "source.kafka.sasl.password: environment variable VIGIL_NOT_SET_ANYWHERE is not set"),
    ({"source": {"kafka": {"group.id": "x"}}}, "source.kafka.group.id: set by Vigil"),
    ({"service": {"clock": "moon"}}, "service.clock"),
    ({"output": {"queue_retention_days": -1}}, "output.queue_retention_days: must be ≥ 0"),
    ({"output": {"queue_db": "sqlite:///var/q.sqlite"}}, "output.queue_db: queue store 'sqlite:///var/q.sqlite'"),
    ({"replay": {"start": "earliest", "stop": "end"}}, "replay.stop: unknown key"),
    ({"scoring": {"modle": "m"}}, "scoring.modle: unknown key"),
    ({"scoring": {"model": "/nonexistent/model"}}, "scoring.model: no model directory"),
    # values that load but would break the service later, or silently
    ({"source": {"batch_timeout_s": -1}}, "source.batch_timeout_s: -1"),
    ({"source": {"max_message_bytes": 0}}, "source.max_message_bytes: must be ≥ 1"),
    ({"source": {"topics": [""]}}, "source.topics: at least one topic, none empty"),
    ({"source": {"auto_offset_reset": "oldest"}}, "source.auto_offset_reset: one of"),
    ({"source": {"avro_backend": "fast"}}, "source.avro_backend 'fast': one of auto, fastavro, cavro"),
    ({"service": {"error_budget": -1}}, "service.error_budget: must be ≥ 0"),
    ({"service": {"metrics_port": 99999}}, "service.metrics_port"),
    ({"source": {"kafka": {"enable.auto.commit": False}}}, "source.kafka.enable.auto.commit: set by Vigil"),
    ({"source": {"kafka": {"auto.offset.reset": "latest"}}}, "(use source.auto_offset_reset)"),
    ({"output": {"kafka": {"acks": 0}}}, "output.kafka.acks: must be 'all'"),
    ({"output": {"kafka": {"acks": "all", "request.required.acks": 1}}},  # the alias had slipped past
     "output.kafka.request.required.acks: must be 'all'"),
    ({"replay": {"start": "yesterday"}}, "replay.start: Invalid isoformat"),
    ({"replay": {"start": "1697673600"}}, "replay.start: '1697673600' looks like Unix seconds"),
    ({"replay": {"start": "2023-10-20T00:00:00Z", "end": "2023-10-19T00:00:00Z"}}, "replay.end: 2023-10-19"),
    ({"replay": {"queue_db": "sqlite:///q"}}, "replay.queue_db: queue store"),
    ({"replay": {"end_grace_s": -1}}, "replay.end_grace_s: -1.0 is not within"),
    ({"replay": {"end_grace_s": "5m"}}, "replay.end_grace_s"),
    # found by a review that ran the service against a broker
    ({"source": {"topics": ["in"]}, "output": {"dead_letter_topic": "in"}},
     "output.dead_letter_topic: 'in' is also read"),  # it looped one bad message for ever
    ({"source": {"topics": ["^alerts[0-9]$"]}, "output": {"annotations_topic": "alerts7"}},
     "output.annotations_topic: 'alerts7' is also read (source.topics '^alerts[0-9]$')"),
    ({"output": {"annotations_topic": "a", "dead_letter_topic": "a"}}, "output.dead_letter_topic: the same topic"),
    ({"output": {"annotations_topic": "has space"}}, "output.annotations_topic: 'has space' is not a topic name"),
    ({"source": {"topics": ["ztf alerts"]}}, "source.topics: 'ztf alerts' is not a topic name"),  # it waited for ever
    ({"source": {"topics": ["t", "t"]}}, "source.topics: 't' is listed twice"),
    ({"source": {"topics": ["^a["]}}, "source.topics: '^a[' is not a valid pattern"),
    ({"source": {"batch_size": 1_000_001}}, "source.batch_size: must be 1 … 1000000"),
    ({"source": {"batch_timeout_s": float("inf")}}, "source.batch_timeout_s: inf: must be > 0"),
    ({"source": {"batch_timeout_s": 5.0}}, "source.batch_timeout_s: 5.0: must be > 0 and at most 1 s"),  # was capped
    ({"source": {"kafka": {"metadata.broker.list": "h:9092"}}}, "(use source.bootstrap_servers)"),
    ({"source": {"kafka": {"ssl.key.pem": "-----BEGIN"}}}, "source.kafka.ssl.key.pem: secrets must come from"),
    ({"service": {"log_interval_s": float("nan")}}, "service.log_interval_s: must be > 0"),
    ({"output": {"queue_retention_days": float("nan")}}, "output.queue_retention_days: must be ≥ 0"),
    ({"replay": {"namespace": ""}}, "replay.namespace: '' is not a topic-name suffix"),
    ({"service": {"log_level": "verbose"}}, "service.log_level: one of DEBUG, INFO, WARNING, ERROR"),
    ({"source": {"kafka": {"sasl.password": {"file": "/nonexistent/secret"}}}},
     "source.kafka.sasl.password: cannot read the secret file /nonexistent/secret"),
    ({"source": {"kafka": {"sasl.password": {"env": "A", "file": "b"}}}}, "source.kafka.sasl.password: librdkafka"),
    ({"source": {"kafka": {"sasl.password": {"file": 3}}}}, "source.kafka.sasl.password: librdkafka"),
    ({"output": {"kafka": {"bootstrap.servers": "ours:9092"}}}, "output.kafka.bootstrap.servers: set by Vigil "
                                                                 "(use output.bootstrap_servers)"),
    ({"output": {"bootstrap_servers": "127.0.0.1:9092", "annotations_topic": "ztf_alerts"}},
     "output.annotations_topic: 'ztf_alerts' is also read"),  # naming the source's cluster is the same cluster
    ({"source": {"bootstrap_servers": "k1:9092,K2:9092"},
      "output": {"bootstrap_servers": "k2:9092", "annotations_topic": "ztf_alerts"}},
     "output.annotations_topic: 'ztf_alerts' is also read"),  # one broker in common: one cluster
])
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert key in str(e.value)


def test_a_secret_can_come_from_a_file(tmp_path):
    """Docker and Kubernetes mount secrets as files; the final newline is not part of the secret."""
    f = tmp_path / "kafka_password"
    f.write_text("s3cret \n")
    cfg = parse_config({"output": {"kafka": {"sasl.password": {"file": str(f)}}}})
    assert cfg.output.kafka["sasl.password"] == "s3cret "


def test_the_log_level_comes_from_the_config_and_v_wins(tmp_path, monkeypatch):
    import logging

    import stream.kafka
    from stream.cli import main

    seen = []
    monkeypatch.setattr(stream.kafka, "run_service", lambda *a, **k: seen.append(logging.getLogger().level)
                        or __import__("stream.service", fromlist=["Counts"]).Counts())
    p = tmp_path / "quiet.toml"
    p.write_text('[source]\ntopics = ["x"]\n[service]\nlog_level = "WARNING"\n')
    root = logging.getLogger()
    level = root.level
    try:
        assert main(["run", "--config", str(p)]) == 0
        assert main(["run", "-v", "--config", str(p)]) == 0  # -v after the command, too
        assert main(["-v", "run", "--config", str(p)]) == 0
        assert main(["queue", "list", "--db", str(tmp_path / "none.sqlite"), "-v"]) == 2  # a nested command too
    finally:
        root.setLevel(level)
    assert seen == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_outputs_on_another_cluster_may_reuse_a_source_topic_name():
    cfg = parse_config({"source": {"topics": ["alerts"]},
                        "output": {"bootstrap_servers": "ours:9092", "annotations_topic": "alerts"}})
    assert cfg.output.bootstrap_servers == "ours:9092"


def test_librdkafka_settings_pass_through_untouched():
    cfg = parse_config({"source": {"kafka": {"security.protocol": "SASL_SSL", "fetch.max.bytes": 1024,
                                             "ssl.endpoint.identification.algorithm": "https"}}})
    assert cfg.source.kafka == {"security.protocol": "SASL_SSL", "fetch.max.bytes": 1024,
                                "ssl.endpoint.identification.algorithm": "https"}


def test_cli_reports_config_error_by_key(tmp_path, capsys):
    from stream.cli import main

    p = tmp_path / "bad.toml"
    p.write_text('[source]\ntopic = ["x"]\n')
    assert main(["run", "--config", str(p)]) == 2
    assert "source.topic: unknown key" in capsys.readouterr().err


def test_configured_model_that_cannot_load_is_named(tmp_path):
    from stream.config import load_configured_model

    assert load_configured_model(parse_config({})) is None  # the shipped default
    (tmp_path / "metadata.json").write_text('{"format": "vigil-scorer/1", "kind": "table"}')
    cfg = parse_config({"scoring": {"model": str(tmp_path)}})
    with pytest.raises(ConfigError, match="scoring.model: .*not an alert scorer"):
        load_configured_model(cfg)


def test_good_replay_and_producer_settings_load():
    cfg = parse_config({"replay": {"start": "2023-10-19T00:00:00Z", "end": "1697760000000"},
                        "output": {"kafka": {"acks": "all"}}})
    assert cfg.replay.end == "1697760000000" and cfg.replay.queue_db == ""


def test_command_line_replay_times_are_checked_like_the_file(tmp_path, capsys):
    from stream.cli import main

    p = tmp_path / "ok.toml"
    p.write_text('[source]\ntopics = ["x"]\n')
    assert main(["run", "--config", str(p), "--from", "2023-10-20", "--until", "2023-10-19"]) == 2
    assert "--until: 2023-10-19 is not after --from 2023-10-20" in capsys.readouterr().err  # the flags' names
    assert main(["run", "--config", str(p), "--from", "yesterday"]) == 2
    assert "--from: " in capsys.readouterr().err
    q = tmp_path / "end.toml"  # the end from the file, the start from the command line: each by its own name
    q.write_text('[source]\ntopics = ["x"]\n[replay]\nend = "2023-10-19"\n')
    assert main(["run", "--config", str(q), "--from", "2023-10-20"]) == 2
    assert "replay.end: 2023-10-19 is not after --from 2023-10-20" in capsys.readouterr().err
    r = tmp_path / "pattern.toml"  # a replay reads the topics a pattern matches: never its own outputs
    r.write_text('[source]\ntopics = ["^.*[.]replay$"]\n')
    assert main(["run", "--config", str(r), "--replay"]) == 2
    assert "source.topics: the pattern '^.*[.]replay$' matches the replay's output 'vigil.annotations.replay'" \
        in capsys.readouterr().err


def test_a_queue_store_that_cannot_be_opened_names_the_key(tmp_path, capsys):
    """Before, a directory as the store stopped the service with a traceback and no key."""
    from stream.cli import main

    p = tmp_path / "q.toml"
    p.write_text(f'[source]\nbootstrap_servers = "127.0.0.1:9"\ntopics = ["x"]\n'
                 f'[output]\nqueue_db = "{tmp_path}"\n')
    assert main(["run", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"vigil: error: output.queue_db: cannot open the queue store {tmp_path}" in err and "Traceback" not in err


def test_outputs_on_the_source_cluster_log_in_as_the_source_does(monkeypatch):
    """With no ``output.bootstrap_servers`` the producers write to the source's cluster; the SASL/SSL
    settings of ``[source.kafka]`` had not reached them (read with a login, written without one)."""
    from stream.config import output_kafka_settings

    monkeypatch.setenv("VIGIL_TEST_PW", "p")
    source = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u",
              "sasl.password": {"env": "VIGIL_TEST_PW"}, "ssl.ca.location": "/ca.pem", "fetch.max.bytes": 1024,
              "session.timeout.ms": 45000}
    same = parse_config({"source": {"kafka": source}, "output": {"kafka": {"linger.ms": 20, "sasl.username": "w"}}})
    assert output_kafka_settings(same) == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                                           "sasl.username": "w", "sasl.password": "p", "ssl.ca.location": "/ca.pem",
                                           "linger.ms": 20}  # the output's own win; consumer settings stay behind
    other = parse_config({"source": {"kafka": source},
                          "output": {"bootstrap_servers": "ours:9092", "kafka": {"linger.ms": 20}}})
    assert output_kafka_settings(other) == {"linger.ms": 20}  # another cluster: its own settings only
    named = parse_config({"source": {"bootstrap_servers": "b1:9092,b2:9092", "kafka": source},
                          "output": {"bootstrap_servers": "B2:9092", "kafka": {"linger.ms": 20}}})
    assert output_kafka_settings(named)["security.protocol"] == "SASL_SSL"  # the source's cluster, named


def test_an_unquoted_dotted_librdkafka_key_is_named_as_such(tmp_path):
    """TOML reads ``security.protocol = "SASL_SSL"`` as a table ``security``; the error had blamed its value."""
    p = tmp_path / "dotted.toml"
    p.write_text('[source.kafka]\nsecurity.protocol = "SASL_SSL"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "source.kafka.security" in str(e.value) and '"security.protocol" = ..., quoted' in str(e.value)


def test_a_queue_database_password_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    """Only Kafka secrets had been kept out of the file: a PostgreSQL password in queue_db loaded silently,
    and queue_db had no env/file form."""
    for url in ("postgresql://vigil:hunter2@db.example.org/vigil", "postgres://db.example.org/vigil?password=x"):
        with pytest.raises(ConfigError, match="output.queue_db: a password written in the file"):
            parse_config({"output": {"queue_db": url}})
    assert parse_config({"output": {"queue_db": "postgresql://vigil@db.example.org/vigil"}}).output.queue_db \
        == "postgresql://vigil@db.example.org/vigil"  # no password: PGPASSWORD or ~/.pgpass
    monkeypatch.setenv("VIGIL_TEST_DB", "postgresql://vigil:hunter2@db.example.org/vigil")
    (tmp_path / "db.txt").write_text("replay.sqlite\n")
    cfg = parse_config({"output": {"queue_db": {"env": "VIGIL_TEST_DB"}},
                        "replay": {"queue_db": {"file": str(tmp_path / "db.txt")}}})
    assert cfg.output.queue_db == "postgresql://vigil:hunter2@db.example.org/vigil"
    assert cfg.replay.queue_db == "replay.sqlite"


def test_run_check_loads_everything_and_starts_nothing(tmp_path, capsys, monkeypatch):
    """``vigil run --config X --check``: secrets, schemas and the model are loaded, nothing is started and no
    secret is printed; a config that would fail says so by key, as ``vigil run`` would."""
    from stream.cli import main

    monkeypatch.setenv("VIGIL_TEST_PW", "s3cret")
    ok = tmp_path / "ok.toml"
    ok.write_text('[source]\nbootstrap_servers = "nowhere.invalid:9092"\n[source.kafka]\n'
                  '"sasl.password" = { env = "VIGIL_TEST_PW" }\n"security.protocol" = "SASL_SSL"\n'
                  f'[scoring]\nmodel = "{ROOT / "models" / "default_model"}"\n')
    assert main(["run", "--config", str(ok), "--check"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "sasl.password" in out and "s3cret" not in out and "xgb-" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[source]\nschema_dir = "/nonexistent"\n')
    assert main(["run", "--config", str(bad), "--check"]) == 2
    assert "source.schema_dir" in capsys.readouterr().err


def test_run_check_says_what_a_replay_would_do(tmp_path, capsys):
    """``--check --replay`` had printed the live service's group, as plain ``--check`` does."""
    from stream.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('[source]\ngroup_id = "live"\n')
    assert main(["run", "--config", str(cfg), "--check", "--replay"]) == 0
    out = capsys.readouterr().out
    assert ("replay (no [replay] section: the whole topic): earliest → end under group vigil-replay, never "
            "committing; outputs vigil.annotations.replay, vigil.deadletter.replay") in out
    cfg.write_text('[source]\ngroup_id = "live"\n[replay]\ngroup_id = "night"\nnamespace = "r1"\n')
    assert main(["run", "--config", str(cfg), "--check", "--from", "2023-10-19T00:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "replay: 2023-10-19T00:00:00Z → end under group night" in out and "vigil.annotations.r1" in out
    assert main(["run", "--config", str(cfg), "--check"]) == 0
    assert "under group" not in capsys.readouterr().out


def test_a_missing_optional_extra_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """A postgresql:// store without psycopg, or --workers without gunicorn, had ended in a 29-line traceback
    (and ``queue serve`` had first said it was serving)."""
    import sys

    from stream.cli import main

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where it is not installed
    monkeypatch.setitem(sys.modules, "gunicorn", None)
    assert main(["queue", "list", "--db", "postgresql://vigil@127.0.0.1:5/vigil"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == "vigil: error: a postgresql:// queue store needs psycopg 3: pip install 'vigil[postgres]'"
    assert main(["queue", "serve", "--db", str(tmp_path / "q.sqlite"), "--workers", "2", "--token", "x" * 20]) == 2
    out, err = capsys.readouterr()
    assert "needs gunicorn: pip install 'vigil[serve]'" in err and "Traceback" not in err
    assert "vigil queue: serving" not in out
    monkeypatch.setitem(sys.modules, "stream.pipeline", None)  # any other ImportError is a bug: its traceback stays
    with pytest.raises(ImportError):
        main(["replay", str(tmp_path), "--rejected", str(tmp_path / "r.jsonl")])


def test_version_and_the_demo_names_the_command_as_typed(monkeypatch, capsys):
    import sys

    from stream.annotation import code_version
    from stream.cli import main
    from stream.demo import _command_name

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vigil {code_version()}"
    monkeypatch.setattr(sys, "argv", [".venv/bin/vigil", "demo"])
    assert _command_name() == ".venv/bin/vigil"  # the README installs without activating the environment
    monkeypatch.setattr(sys, "argv", ["/path/to/stream/cli.py", "demo"])
    assert _command_name() == "vigil"


def test_every_unset_secret_variable_is_named_at_once(monkeypatch):
    """``deploy/rubin.toml`` had taken three rounds: each run named one unset variable."""
    for var in ("VIGIL_T_USER", "VIGIL_T_PW", "VIGIL_T_OUT_PW"):
        monkeypatch.delenv(var, raising=False)
    data = {"source": {"kafka": {"sasl.username": {"env": "VIGIL_T_USER"}, "sasl.password": {"env": "VIGIL_T_PW"}}},
            "output": {"bootstrap_servers": "other:9092", "kafka": {"sasl.password": {"env": "VIGIL_T_OUT_PW"}}}}
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert str(e.value) == ("environment variables not set: source.kafka.sasl.username (VIGIL_T_USER), "
                            "source.kafka.sasl.password (VIGIL_T_PW), output.kafka.sasl.password (VIGIL_T_OUT_PW)")
    monkeypatch.setenv("VIGIL_T_USER", "u")
    monkeypatch.setenv("VIGIL_T_PW", "p")
    with pytest.raises(ConfigError, match=r"^output.kafka.sasl.password: environment variable VIGIL_T_OUT_PW is not"):
        parse_config(data)  # one left: said as before, by its key



def test_unset_variables_are_gathered_only_where_a_secret_may_be(monkeypatch):
    """A ``{ env = ... }`` where no secret is taken (``source.group_id``) is that key's error, not one more unset
    variable to set before hearing of it."""
    monkeypatch.delenv("VIGIL_T_A", raising=False)
    monkeypatch.delenv("VIGIL_T_B", raising=False)
    data = {"source": {"group_id": {"env": "VIGIL_T_A"}, "kafka": {"sasl.password": {"env": "VIGIL_T_B"}}},
            "output": {"queue_db": {"env": "VIGIL_T_A"}}}
    with pytest.raises(ConfigError, match=r"^environment variables not set: source.kafka.sasl.password \(VIGIL_T_B\), "
                                          r"output.queue_db \(VIGIL_T_A\)$"):
        parse_config(data)
