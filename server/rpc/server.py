"""The gRPC server: our services, the standard health service and reflection."""

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

from ..build import ModelDescription
from ..config import ServerConfig
from ..engine.engine import Engine
from ..metrics import NO_METRICS, Metrics
from ..model_facts import EngineFacts
from ..session import EngineStreams, RequestSession
from .decode import DecodeRequests
from .generation import GenerationService
from .security import TokenAuth, server_credentials

log = logging.getLogger(__name__)

GENERATION = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADAPTERS = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name


class Health:
    """grpc.health.v1 status for the whole server ("") and each of our services."""

    def __init__(self, services: tuple[str, ...]):
        self.services = services
        self.servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.serving = False

    async def set(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            await self.servicer.set(name, status)


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The server's transport limits (see ServerConfig for each).

    grpc's "overload protection" (on by default) counts a connection's streams until the server has freed
    them, later than the client sees them end, and refuses streams over the limit with RST_STREAM
    (REFUSED_STREAM, UNAVAILABLE for the caller). Off, the limit is plain HTTP/2 concurrency: the client
    queues further calls until one of its streams ends, as the docs promise. --max-concurrent-rpcs still
    bounds the calls a server serves over all connections.
    """
    return [("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ("grpc.http.overload_protection", 0),   # GRPC_ARG_MAX_CONCURRENT_STREAMS_OVERLOAD_PROTECTION
            ("grpc.keepalive_time_ms", config.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", config.keepalive_min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", 2)]


def local_services(config: ServerConfig, engine: Engine, model: ModelDescription, metrics: Metrics | None = None):
    """(request session, model facts, adapter servicer or None) of a server whose engine runs in this process:
    what every transport serves from."""
    session = RequestSession(EngineStreams(engine), config.log_prompts, metrics or NO_METRICS)
    facts = EngineFacts(engine, model, config.max_batch_size)
    adapters = None
    if engine.adapters is not None and config.adapter_service:
        from ..admin import AdapterAdmin
        from .adapters import AdapterService

        adapters = AdapterService(AdapterAdmin(engine.adapters, engine.weights, config.merge_method))
    return session, facts, adapters


def build_server(config: ServerConfig, session: RequestSession, facts, adapters=None,
                 metrics: Metrics | None = None) -> tuple[grpc.aio.Server, Health, int]:
    """A server of the generation service over the session and facts (this process's engine, or a cluster
    front's) and, if given, the adapter servicer, with health, reflection, authentication and the transport
    limits."""
    generation = GenerationService(session, facts, config.default_max_new_tokens)
    credentials = server_credentials(config)
    auth = TokenAuth({GENERATION: config.auth_token, ADAPTERS: config.admin_token},
                     (metrics or NO_METRICS).unauthenticated)
    server = grpc.aio.server(options=channel_options(config), maximum_concurrent_rpcs=config.max_concurrent_rpcs,
                             interceptors=[auth, DecodeRequests()])   # auth first: refusals parse nothing
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
    services = (GENERATION,)
    if adapters is not None:
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(adapters, server)
        services += (ADAPTERS,)
    health_ = Health(services)
    health_pb2_grpc.add_HealthServicer_to_server(health_.servicer, server)
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:    # a taken port: grpc returns 0 or, in newer versions, raises RuntimeError
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"could not listen on {address}; choose another --port (0 = any free one)")
    return server, health_, port
