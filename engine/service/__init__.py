"""The HTTP service around the engine: the seed's contract, its API, worker, schedule and webhooks.

The core (``engine``) never imports this package: it is handed a :class:`engine.finish.Finisher`
that records and delivers a run's notice the way this layer decides.
"""
