"""Settings for the fuzz suite: no deadline (the machine is shared; no timing asserts),
no example database written into the worktree, and MLXLITE_FUZZ_SCALE to run longer."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mlxlite-fuzz",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile("mlxlite-fuzz")
