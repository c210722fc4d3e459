"""One local Ray instance for the whole test session (2 CPUs, 1 fake logical GPU for placement tests)."""
import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # The logical GPU has no device behind it: it lets tests check fractional GPU placement.
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
