"""Light probe modules of the optional backends: ``check(op, problem)`` says why a backend cannot run a call (or
None), ``prefers(op, problem)`` why ``backend="auto"`` should not pick it (or None). They must not import the
backend's library at module level: they are imported on the first call that asks."""
