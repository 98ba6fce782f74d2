"""train/launch.py setup_logging: rank 0 logs to the console and every rank to <run_dir>/logs/rank<N>.log; a record
marked file_only (the traceback of an error that ends a run, which stderr shows already) goes to the file alone."""

import logging

from train.launch import setup_logging


def test_a_file_only_record_reaches_the_rank_log_and_not_the_console(tmp_path, capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(str(tmp_path), 0)
        log = logging.getLogger("train")
        log.info("on both")
        try:
            raise KeyError("boom")
        except KeyError:
            log.exception("the run failed", extra={"file_only": True})
        for h in root.handlers:
            h.flush()
        console = capsys.readouterr().out
        text = (tmp_path / "logs" / "rank0.log").read_text()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "on both" in console and "on both" in text
    assert "the run failed" not in console and "boom" not in console
    assert "[rank0] train: the run failed" in text and "KeyError: 'boom'" in text
