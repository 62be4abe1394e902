"""Event stores: where a run's events are kept (see :mod:`rpcstream.store.base`)."""
