"""Run a script with pp's CPU abort-wait thread off (gloo waits block in the caller, as torch's do), to
measure what that thread costs: `python scripts/noabort_wait.py scripts/bench.py --impl pp ...`."""
import runpy, sys
import pp.comms.abort as a
_init = a.AbortChannel.__init__
def init(self, *args, **kw):
    _init(self, *args, **kw)
    self.blocking = False
a.AbortChannel.__init__ = init
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
