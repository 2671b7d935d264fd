"""The thin ASGI layer `tunesmith serve` puts in front of llama-cpp-python's OpenAI-compatible app.

Contract: `OpenAIFront(app, system_prompt=None, api_key=None)` wraps an ASGI app and, per HTTP request:
- with an `api_key`, refuses a request without `Authorization: Bearer <api_key>` with 401 and an
  OpenAI-style error object (`{"error": {"message", "type", "param", "code": "invalid_api_key"}}`);
- reads the JSON body of `POST /v1/chat/completions` and `POST /v1/completions` and answers a bad
  one itself with 400 and an OpenAI-style `invalid_request_error` naming the field (`param`) —
  not JSON, not an object, no or empty `messages`, no `prompt`, more than one prompt, or anything
  llama-cpp-python's own request models (`llama_cpp.server.types`) reject. Behind it, llama-cpp-python
  would answer these with 500 and a traceback on the console, or (no `messages`) run an empty chat;
- inserts `system_prompt` as the first message of a chat request that has no `system` message,
  which is what `data.system_prompt` does to the conversations a run is trained on; the request
  then goes on, rewritten, to the chat template the GGUF carries. `/v1/completions` takes raw text
  and is passed on untouched.
Every other request passes through as it came. Nothing here loads a model.
"""

from __future__ import annotations

import hmac
import json

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_BODY = 16 * 2**20  # bytes; a larger request body is refused (413) before it is parsed


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> bytes:
    """OpenAI's error object, which the `openai` client turns into `BadRequestError` & co."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _first_validation_error(err) -> BadRequest:
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if not isinstance(part, int) or part >= 0]
    param = ".".join(loc) or None
    return BadRequest(f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg")), param)


def check_request(path: str, body: bytes, system_prompt: str | None = None) -> bytes:
    """The body to pass on (with the system prompt inserted), or `BadRequest` for a bad one."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError

    try:
        payload = json.loads(body)
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError both are
        raise BadRequest(f"the request body is not valid JSON ({err})") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    if path == CHAT:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: expected a non-empty list of {role, content} messages", "messages")
        schema = CreateChatCompletionRequest
    else:
        prompt = payload.get("prompt")
        if prompt is None:
            raise BadRequest("prompt: required (a string)", "prompt")
        if isinstance(prompt, list) and len(prompt) > 1:
            raise BadRequest("prompt: one prompt per request (send a string, or a list of one)", "prompt")
        schema = CreateCompletionRequest
    try:
        schema.model_validate(payload)
    except ValidationError as err:
        raise _first_validation_error(err) from None
    if path == CHAT and system_prompt is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
        return json.dumps(payload).encode()
    return body


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class OpenAIFront:
    def __init__(self, app, system_prompt: str | None = None, api_key: str | None = None):
        self.app, self.system_prompt, self.api_key = app, system_prompt, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and not self._authorized(scope):
            body = error_body("Incorrect or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")
            return await self._respond(send, 401, body, [(b"www-authenticate", b"Bearer")])
        if scope["method"] != "POST" or scope["path"] not in (CHAT, COMPLETIONS):
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(receive)
            body = check_request(scope["path"], body, self.system_prompt)
        except BadRequest as bad:
            return await self._respond(send, bad.status, error_body(bad.message, param=bad.param))
        except _Disconnected:
            return None
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        return await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope) -> bool:
        given = (_header(scope, b"authorization") or b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    @staticmethod
    async def _read_body(receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise BadRequest(f"the request body is over {MAX_BODY // 2**20} MiB", status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _respond(send, status: int, body: bytes, headers=()) -> None:
        start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
        await send({"type": "http.response.start", "status": status, "headers": start})
        await send({"type": "http.response.body", "body": body})


class _Disconnected(Exception):
    """The client went away while sending its request: nothing to answer."""


def _replay(body: bytes, receive):
    """A `receive` that hands the app the (rewritten) body once, then the client's own messages
    (so the app still sees a disconnect while it streams)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
