"""Event media: a clip and a snapshot for every event, and their retention.

- :mod:`streamdet.media.sink`: :class:`~streamdet.media.sink.MediaSink`, the output of the
  event router that decides what each event gets;
- :mod:`streamdet.media.recorder`: the worker thread writing live clips as their packets come;
- :mod:`streamdet.media.clips`: stream copy into an MP4 that appears whole (temp name, rename);
- :mod:`streamdet.media.snapshots`: recent frames, JPEG encoding, a file's frame;
- :mod:`streamdet.media.retention`: deleting old media, oldest first, never one being written.
"""
