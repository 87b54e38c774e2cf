"""``streamdet run --backend ray``: one config across a Ray cluster.

One engine actor per node runs the single-machine pipeline (capture, ring, inference, tracker:
:class:`streamdet.pipeline.Pipeline`) for its share of the sources; only the event log's lines
leave it, as small records. The driver writes them to the one JSONL log, each line naming the
node that scored it, and feeds the other outputs. Moving a window between processes costs
milliseconds and an actor ~120 MB (issue 21), so neither windows nor frames cross, and there is
no actor per camera.

Modules, in the order they import each other:

- :mod:`~streamdet.distributed.records`: what an engine sends the driver, and the stand-in
  event log that collects it on the node.
- :mod:`~streamdet.distributed.placement`: which node takes which source (pure logic).
- :mod:`~streamdet.distributed.merge`: the driver's end: one log, one set of outputs.
- :mod:`~streamdet.distributed.engine`: the engine that runs on each node.
- :mod:`~streamdet.distributed.backend`: connecting, the coordinator loop, stopping. The only
  module that imports Ray.
"""
