"""The evaluate stage's actor pool is sized to the Ray cluster it runs on (the backends' comparison on a real model:
tests/end_to_end/test_eval_backends.py)."""
from __future__ import annotations

from llava_core.eval.backends import actor_pool_size


def test_actor_pool_shrinks_to_what_the_cluster_can_hold(ray_session):
    size, resources = actor_pool_size(64)
    assert resources == {"num_cpus": 1}  # no GPU here
    assert 1 <= size <= max(1, int(ray_session.available_resources().get("CPU", 0))) <= 2
