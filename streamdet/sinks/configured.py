"""The outputs a config names beyond the event log and the annotated video: MQTT, webhooks,
event media and the web page.

:func:`build_sinks` is the one place that turns those config sections into
:class:`~streamdet.sinks.base.Sink` objects; the pipeline hands them to the event router. Each
output's module is imported only when the config asks for it, so a run without MQTT never loads
paho.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamdet.config import RunConfig
from streamdet.sinks.base import RunHealth, Sink
from streamdet.sources.packets import PacketRing


@dataclass(frozen=True)
class SinkContext:
    """What the outputs know of the run, beside their own config section.

    Attributes:
        run_id: the run's id (event ids start with it).
        class_names: the model's classes, in score order.
        sources: every source's name, in config order.
        urls: each source's URL, redacted.
        model: ``{"name": ..., "sha256": ...}`` of the model in use.
        stop_event: set when the run stops.
        record_media: :meth:`streamdet.router.EventRouter.record_media`, for an output that
            completes a clip or snapshot.
        packet_rings: the encoded packets of each source whose capture keeps them (event
            clips are on and its backend demuxes packets), by source name.
        health: the run's health now (sources' last frames, threads alive), for a readiness
            check; callable from any thread. None: unknown (a sink built outside a run).
    """

    run_id: str
    class_names: tuple[str, ...]
    sources: tuple[str, ...]
    urls: Mapping[str, str]
    model: Mapping[str, str]
    stop_event: threading.Event
    record_media: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    packet_rings: Mapping[str, PacketRing] = field(default_factory=dict)
    health: Callable[[], RunHealth] | None = None


def build_sinks(cfg: RunConfig, ctx: SinkContext) -> list[Sink]:
    """The outputs ``cfg`` names (none by default).

    Raises:
        StreamdetError: a section that cannot work (checked before anything starts).
    """
    sinks: list[Sink] = []
    # The media output first: outputs are closed in order at the end of a run, and the clips it
    # completes then must still reach the others (MQTT, webhooks).
    media = _media_sink(cfg, ctx)
    if media is not None:
        sinks.append(media)
    if cfg.sinks.mqtt is not None:
        from streamdet.sinks.mqtt import MqttSink, labels_of  # paho only when asked for

        sinks.append(
            MqttSink(
                cfg.sinks.mqtt,
                sources=ctx.sources,
                labels=labels_of(ctx.class_names, cfg.events.background),
                run_id=ctx.run_id,
                model=ctx.model,
                stride=cfg.window.stride,
                length=cfg.window.length,
            )
        )
    if cfg.sinks.webhooks:
        from streamdet.sinks.webhooks import build_webhooks

        sinks.append(
            build_webhooks(
                cfg.sinks.webhooks,
                class_names=ctx.class_names,
                run_id=ctx.run_id,
                model=ctx.model,
                window=cfg.window,
            )
        )
    if cfg.web is not None:
        from streamdet.web import WebSink

        sinks.append(
            WebSink(
                cfg.web,
                sources=ctx.sources,
                class_names=ctx.class_names,
                urls=ctx.urls,
                model=ctx.model,
                health=ctx.health,
                media=cfg.media,
            )
        )
    return sinks


def _media_sink(cfg: RunConfig, ctx: SinkContext) -> Sink | None:
    """Event clips and snapshots (``media``): a live source's clips come from its packet ring,
    a file's clips and snapshots from the file itself."""
    media = cfg.media
    if media is None or not (media.clips.enabled or media.snapshots.enabled):
        return None
    from streamdet.media.sink import MediaSink, MediaSource
    from streamdet.sources.opening import SourceKind, source_kind

    sources = {
        s.name: MediaSource(
            s.name,
            ring=ctx.packet_rings.get(s.name),
            file=Path(s.url.removeprefix("file://"))
            if source_kind(s.url) is SourceKind.FILE
            else None,
        )
        for s in cfg.sources
    }
    return MediaSink(
        media, sources=sources, record_media=ctx.record_media, stop_event=ctx.stop_event
    )
