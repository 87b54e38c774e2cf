"""The web output: a live page of the cameras and events, the events API, ``/healthz``,
``/readyz`` and Prometheus ``/metrics`` (``web`` in the config, or ``streamdet run --web``).

Modules: ``sink`` (the output of the event stage), ``server`` (HTTP: routes, the token, limits,
and why the standard library's server), ``api`` (the event store and its filters), ``live``
(each source's newest annotated JPEG, encoded once for every viewer), ``metrics`` (the
Prometheus registry), and ``page.html`` (the page: no build step, nothing from a CDN).
"""

from streamdet.web.sink import WebSink

__all__ = ["WebSink"]
