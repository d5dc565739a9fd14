"""Helpers of the password-check gate tests: a hand-driven thread pool."""
from twisted.internet import defer


class ManualRunner:
    """Stands for the thread pool: records each check, the test fires it."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, *args):
        d = defer.Deferred()
        self.calls.append((fn, args, d))
        return d

    def finish(self, index=0):
        """Run call ``index``; its Deferred fires with the result or, as
        ``deferToThreadPool``'s would, fails with what it raised."""
        fn, args, d = self.calls.pop(index)
        defer.maybeDeferred(fn, *args).chainDeferred(d)


def result(d):
    """What ``d`` fired with (it must have fired)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]
