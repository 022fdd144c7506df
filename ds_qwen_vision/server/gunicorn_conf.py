"""gunicorn settings for the HTTP front, all taken from the deployment config.

    export DSQV_CONFIG_JSON="$(python -m ds_qwen_vision.config --config FILE [overrides] --dump)"
    gunicorn -c python:ds_qwen_vision.server.gunicorn_conf 'ds_qwen_vision.server.app:create_app_from_env()'

gthread workers: a streaming response holds a thread, not a process, while it waits on rank 0.
"""
from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile

from ds_qwen_vision.config import config_from_env

_config = config_from_env()
_server = _config.server

# An IPv6 literal needs brackets in a bind address.
bind = [f"[{_server.host}]:{_server.port}" if ":" in _server.host else f"{_server.host}:{_server.port}"]
worker_class = "gthread"
workers = _server.workers
threads = _server.threads
timeout = _server.timeout_s
graceful_timeout = math.ceil(_server.shutdown_grace_s)
proc_name = "ds-qwen-vision-front"
# launch.sh is the control interface.  gunicorn's own control socket (>= 25.1) defaults to one path per
# user ($HOME/.gunicorn/gunicorn.ctl), so every front on the host would take it over from the others
# and `gunicornc` would reach whichever started last.  (Older gunicorns ignore the unknown setting.)
control_socket_disable = True

# Everything (gunicorn's error and access logs, our modules' loggers) goes to stderr.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
    },
}

# prometheus_client multiprocess mode: each worker writes its metrics to files in the folder
# PROMETHEUS_MULTIPROC_DIR and /metrics sums them.  launch.sh may give one; otherwise the master
# makes a private one before the first fork, so that every worker inherits it before it imports
# prometheus_client (which reads the variable at import).
_own_prometheus_dir: str | None = None


def on_starting(server) -> None:
    global _own_prometheus_dir
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = _own_prometheus_dir = tempfile.mkdtemp(prefix="dsqv-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # Files left by an earlier run would be summed into this one's counters.
    for path in glob.glob(os.path.join(folder, "*.db")):
        os.unlink(path)


def post_worker_init(worker) -> None:
    """gunicorn answers what it refuses before the app runs (a request line over limit_request_line: 414;
    headers over limit_request_field_size or limit_request_fields: 431; a malformed request: 400) with an HTML
    page from `gunicorn.util.write_error`, which no setting changes (benoitc/gunicorn#993). In each worker,
    that function writes the OpenAI error shape instead (errors.raw_error_response), with gunicorn's status."""
    from gunicorn import util

    from ds_qwen_vision.server.errors import raw_error_response

    def write_error(sock, status_int: int, reason: str, mesg: str) -> None:
        util.write_nonblock(sock, raw_error_response(status_int, reason, mesg))

    util.write_error = write_error


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess  # late: workers, not this import, need the folder

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    if _own_prometheus_dir is not None:
        shutil.rmtree(_own_prometheus_dir, ignore_errors=True)
