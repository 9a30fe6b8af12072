"""What a cluster front tells a client for what Ray raised (server/cluster/front.py), with Ray's own
exception classes; and that our errors survive the pickling that carries them from a replica."""

import pickle

import pytest
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from loraplex.server.cluster.front import from_ray
from loraplex.server.errors import (InternalError, InvalidArgumentError, NotFoundError, ResourceExhaustedError,
                                    UnavailableError, status_of)


def test_a_replicas_error_comes_back_whole_with_its_field_and_reason():
    error = pickle.loads(pickle.dumps(InvalidArgumentError("temperature", "must be >= 0").because("validation")))
    assert (type(error), error.field, error.detail, str(error)) == (
        InvalidArgumentError, "temperature", "must be >= 0", "temperature: must be >= 0")
    wrapped = ray_errors.RayTaskError("generate", "Traceback (most recent call last): ...", NotFoundError("no x"))
    assert type(from_ray(wrapped)) is NotFoundError and str(from_ray(wrapped)) == "no x"


@pytest.mark.parametrize("raised, expected", [
    (ray_errors.ActorDiedError(), UnavailableError),
    (ray_errors.ActorUnavailableError("gone", b"\0" * 16), UnavailableError),
    (serve_errors.RequestCancelledError("r1"), UnavailableError),
    (serve_errors.BackPressureError(num_queued_requests=9, max_queued_requests=8), ResourceExhaustedError),
    (ray_errors.RayTaskError("generate", "Traceback ...", ZeroDivisionError("boom")), InternalError),
])
def test_ray_failures_map_to_a_single_servers_statuses_without_tracebacks(raised, expected):
    error = from_ray(raised)
    assert type(error) is expected
    assert "Traceback" not in str(error) and "ray" not in str(error).lower()
    if expected is ResourceExhaustedError:
        assert error.reason == "queue_full"
    assert status_of(error) != "UNKNOWN"
