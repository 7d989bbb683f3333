import os
import shutil
import tempfile

# Simulated devices must be configured before jax is first imported anywhere in the test process.
# The programs the tests compile are small and run briefly: LLVM's -O0 cuts their compile time by a third.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the run, shared by the xdist workers and the CLIs the tests start: the training tests
# compile the same tiny programs again and again, and compiling is most of their time (a two-step run: 26 s
# cold, 8 s warm). Every program is still compiled once per run.
CACHE = os.path.join(tempfile.gettempdir(), f"zenjax-jax-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, once the workers are done
        shutil.rmtree(CACHE, ignore_errors=True)
