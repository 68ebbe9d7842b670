"""Settings for the whole test run."""

from hypothesis import settings

# The property tests are pure and fast; a per-example deadline would only measure how
# busy the machine is (a shared CI core can stall any example past 200 ms).
settings.register_profile("sidecar", deadline=None)
settings.load_profile("sidecar")
