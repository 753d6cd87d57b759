"""``mmstream bench``: how fast is the worker, next to what bounds it and what a user
would write instead?

In one run on one machine it measures (:mod:`.measure`):

1. **raw ORT**: ``session.run`` alone on real (preprocessed) tensors of the
   model, at several batch sizes, on the chosen device (events/s per batch size,
   median of three timed repeats after a warm-up);
2. **raw consume**: a plain consumer of each installed client (no group) reading every
   part of the benchmark's pre-produced topic (parts/s, events/s, MB/s), and the
   **naive baseline** (:mod:`worker.tools.bench.baseline`): the minimal consume -> group by
   key -> ORT -> JSON -> produce loop a user would write instead, with none of the
   worker's guarantees, on the worker's client, model and batch size;
3. **end to end**: the real worker (``mmstream worker`` processes, a fresh group) on
   that pre-produced topic: events/s from the first record consumed to the last
   prediction acknowledged, and the latency of each prediction (its record timestamp
   minus the newest part's record timestamp; here the parts were all written *before*
   the worker started, so that latency is mostly queueing);
4. **open loop**: a fresh topic, the worker running, events produced by a
   separate process at ``open_loop_fraction`` of the measured end-to-end rate:
   latency p50/p95/p99 under that load.

:func:`run_bench` (:mod:`.run`) returns a typed :class:`BenchReport` (:mod:`.results`)
and writes ``bench.json`` (:meth:`BenchReport.to_json`), ``bench.md`` (tables,
:mod:`.report`) and ``bench.png`` (throughput vs batch size with the raw-ORT line;
latency distributions; every measurement side by side, :mod:`.plot`) to ``out``;
:func:`format_summary` is what the CLI prints, with the ratios of end to end to raw
ORT, to each client's raw consume and to the naive baseline. A benchmark reports
numbers; it never judges them.
"""
