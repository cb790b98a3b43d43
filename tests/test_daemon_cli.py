"""daemon/cli.py and daemon/logging.py: options, overrides, config errors, log formats."""

from __future__ import annotations

import io
import json

from xr.core.logs import configure_logging
from xr.daemon.cli import build_parser, main, parse_overrides


def test_overrides_from_flags():
    args = build_parser().parse_args(
        ["--batch-size", "8", "--stable-ms", "100", "--set", "csv.rotation=rows", "--set", "daemon.max_pixels=1000"]
    )
    ov = parse_overrides(args)
    assert ov["daemon.batch_size"] == 8 and ov["daemon.stable_ms"] == 100
    assert ov["csv.rotation"] == "rows" and ov["daemon.max_pixels"] == 1000
    assert "daemon.device" not in ov  # unset flags do not override
    assert parse_overrides(build_parser().parse_args(["--set", "daemon.db=null"])) == {"daemon.db": None}


def test_bad_config_exits_2(tmp_path, capsys):
    assert main(["--watch", str(tmp_path), "--set", "daemon.batch_sise=3"]) == 2
    assert "batch_sise" in capsys.readouterr().err
    # a recipe key is not the operator's: the daemon takes preprocessing from the checkpoint
    assert main(["--watch", str(tmp_path), "--set", "preprocess.render_size=112"]) == 2
    assert "preprocess.render_size belongs in recipe.yaml, read by xr-train" in capsys.readouterr().err


def test_xr_config_names_the_config_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.yaml").write_text("daemon:\n  stable_ms: -5\n")
    monkeypatch.setenv("XR_CONFIG", str(tmp_path / "mine.yaml"))
    assert main(["--watch", str(tmp_path)]) == 2
    assert "daemon.stable_ms: -5 is out of range; must be >= 0" in capsys.readouterr().err


def test_json_and_console_logs():
    buf = io.StringIO()
    log = configure_logging("json", stream=buf)
    log.warning("flagged", file="/in/a.png", probability=0.9)
    ev = json.loads(buf.getvalue())
    assert ev["event"] == "flagged" and ev["level"] == "warning" and ev["file"] == "/in/a.png" and "timestamp" in ev
    buf = io.StringIO()
    configure_logging("console", stream=buf).error("file_error", file="/in/b.png", reason="empty file (0 bytes)")
    out = buf.getvalue()
    assert "file_error" in out and "empty file" in out and not out.startswith("{")


def test_malformed_set_value_exits_2(tmp_path, capsys):
    assert main(["--watch", str(tmp_path), "--set", "daemon.batch_size=["]) == 2
    assert "--set daemon.batch_size=[: the value is not valid YAML" in capsys.readouterr().err


def test_a_closed_log_stream_is_not_fatal():
    class Closed(io.StringIO):
        attempts: list[str] = []

        def write(self, text):
            self.attempts.append(text)
            raise BrokenPipeError(32, "Broken pipe")

    log = configure_logging("json", stream=Closed())
    assert log.error("file_error", file="/in/a.png", reason="x") is None  # returns: no exception reaches the caller
    assert len(Closed.attempts) == 1 and json.loads(Closed.attempts[0])["event"] == "file_error"
    log.warning("flagged", file="/in/b.png")
    log.info("batch", size=3)
    assert len(Closed.attempts) == 1  # logging is off from the broken pipe on: not one more write is tried
    buf = io.StringIO()
    configure_logging("json", stream=buf).info("seen", file="/in/caf\udce9.png")  # a name that is not UTF-8
    assert json.loads(buf.getvalue())["file"] == "/in/caf\udce9.png"


def test_a_name_the_log_stream_cannot_encode_does_not_silence_later_lines():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="latin-1", errors="strict", write_through=True)
    log = configure_logging("console", stream=stream)
    log.info("one")
    log.info("two", file="/in/снимок.png")
    log.info("three")
    text = raw.getvalue().decode("latin-1")
    assert "one" in text and "two" in text and "three" in text
