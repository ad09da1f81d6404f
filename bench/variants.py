"""The proposed fixes as app variants: the real app (`api.create_app()`) with one setting changed,
without touching the service's code (bench/profile.py measures them side by side):
- `no_preping`: the engine without `pool_pre_ping` (one `SELECT 1` round trip per request less);
- `no_sent_event`: Celery's `task_send_sent_event` off (one Redis PUBLISH per escalate less);
- `both`: the two together;
- `no_limits_or_metrics`: without the per-key rate limit (api/limits.py) and the request metrics'
  hooks (api/metrics.py), which the app as is runs with (issue 12: within 10% of this).

The app as is counts every request against a per-key limit too high to refuse any (the benchmark's
environment turns the limits off, as the service's own tests do), and its metrics in multiprocess
mode as under gunicorn (bench/profile.py sets PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations


def _without_preping(app):
    # The app's own engine and pool, with the checkout ping off (Pool keeps the flag in _pre_ping).
    app.extensions["db"].kw["bind"].pool._pre_ping = False
    return app


# Every request counted in Redis, none refused: what the limiter costs, not what it refuses.
COUNTED_NEVER_REFUSED = {"RATE_LIMIT_PER_KEY": "1000000000/minute", "RATE_LIMIT_FAILED_AUTH": "60/minute"}


def baseline():
    from api import create_app

    return create_app(COUNTED_NEVER_REFUSED)


def no_limits_or_metrics():
    from api import create_app, metrics

    app = create_app({"RATE_LIMIT_PER_KEY": "off", "RATE_LIMIT_FAILED_AUTH": "off"})
    hooks = {metrics.init_app.__module__}  # the request hooks api/metrics.py registers
    for funcs in (*app.before_request_funcs.values(), *app.after_request_funcs.values()):
        funcs[:] = [f for f in funcs if f.__module__ not in hooks]
    return app


def no_preping():
    return _without_preping(baseline())


def no_sent_event():
    app = baseline()
    app.extensions["celery"].conf.task_send_sent_event = False
    return app


def both():
    app = no_preping()
    app.extensions["celery"].conf.task_send_sent_event = False
    return app


VARIANTS = {
    "api as is": baseline,
    "api, no pool pre-ping": no_preping,
    "api, no task-sent event": no_sent_event,
    "api, both": both,
    "api, no limits or metrics": no_limits_or_metrics,
}
