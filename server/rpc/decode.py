"""Request bytes that do not parse get INVALID_ARGUMENT.

grpc parses a request before the handler runs and answers a parse failure (a truncated varint, a string
field that is not UTF-8, ...) with UNKNOWN or INTERNAL, which reads as a server bug. This interceptor hands
each unary-request handler the raw bytes instead and parses them itself, so the client learns which
message was malformed and why. Stream-request handlers (reflection) are left as grpc made them.
"""

import inspect

import grpc


class DecodeRequests(grpc.aio.ServerInterceptor):
    def __init__(self):
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}   # method path -> handler taking raw bytes

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = self._wrapped[details.method] = _raw_bytes_handler(handler)
        return wrapped


def _raw_bytes_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    if handler.response_streaming:
        behavior = handler.unary_stream
        # async generators (our services) and coroutines writing with context.write (health Watch)
        body = _streaming(behavior, parse) if inspect.isasyncgenfunction(behavior) else _unary(behavior, parse)
        return grpc.unary_stream_rpc_method_handler(body, response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, parse),
                                               response_serializer=handler.response_serializer)


def _unary(behavior, parse):
    async def call(raw: bytes, context):
        return await behavior(await _parse(parse, raw, context), context)
    return call


def _streaming(behavior, parse):
    async def call(raw: bytes, context):
        async for response in behavior(await _parse(parse, raw, context), context):
            yield response
    return call


async def _parse(parse, raw: bytes, context):
    try:
        return parse(raw)
    except Exception as exc:   # noqa: BLE001 - whatever a deserializer raises, the bytes came from the client
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
