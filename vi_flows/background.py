"""A function run on a daemon thread, its result collected later: ``fit`` compiles its step this
way while the first steps run eagerly (:class:`~vi_flows.elbo_step.ELBOStep`).

A daemon thread, not an executor: a fit that ends or fails before the result is needed must not
hold the interpreter open until the compiler is done.
"""

import threading


class InBackground:
    """``function()`` started on a daemon thread; :meth:`result` waits for it and returns its value
    or raises what it raised."""

    def __init__(self, function):
        self._value, self._failure = None, None
        self._thread = threading.Thread(target=self._run, args=(function,), name="vi-flows compile", daemon=True)
        self._thread.start()

    def _run(self, function):
        try:
            self._value = function()
        except BaseException as failure:  # handed to the waiting thread, which decides
            self._failure = failure

    def result(self):
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._value
