"""The one error type of the HTTP service, and where errors from other deployments are turned into it.

``RequestError`` is raised wherever a request is refused: by the schemas' checks (through the
ingress's validation handler), by the ingress (limits, unknown model, auth) and inside the
generator deployment (a prompt too long in tokens, a cancelled or failed row, no database to add
documents to). It carries its HTTP status and the OpenAI error fields (``type``, ``code``,
``param``) and pickles with them, so it crosses deployments as itself.

Ray wraps an exception raised in a replica in ``RayTaskError``; ``from_deployment_failure`` is the
one place that unwraps it (``RayTaskError.cause``). The ingress's exception handler is the one place
that turns a ``RequestError`` into an HTTP answer (``error_body``: OpenAI's shape).

No Ray, FastAPI or torch import at module level: the generator and the ingress both import this.
"""

from __future__ import annotations

import logging

log = logging.getLogger("retro_ray.serve")

UNAVAILABLE = "the generator is unavailable right now; retry shortly"
FAILED = "generation failed; see the server log"
REPLICA_DIED = "the generator replica serving this request died; retry"
REPLICA_DIED_CODE = "replica_died"


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """The JSON of every error answer (OpenAI's shape)."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


class RequestError(Exception):
    """A request the service refuses: one line naming the problem and the fix, and its HTTP status.

    ``type`` defaults to OpenAI's ``invalid_request_error`` below 500 and ``server_error`` from 500 on.
    """

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, int(status), code, param
        self.type = type_ or ("server_error" if self.status >= 500 else "invalid_request_error")

    def __reduce__(self):  # Exception pickles only ``args``; keep every field across deployments
        return (type(self), (self.message, self.status, self.code, self.param, self.type))

    def for_prompt(self, index: int) -> RequestError:
        """The same error, said of prompt ``index`` of a request with several."""
        return RequestError(f"prompt {index}: {self.message}", self.status, self.code, self.param, self.type)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def from_deployment_failure(exc: BaseException) -> RequestError:
    """What a failed call to another deployment means for the client.

    A ``RequestError`` raised in the replica (wrapped by Ray in ``RayTaskError``) comes back as
    itself. Any other exception raised there is a bug in the replica: 500. A replica that died under
    the call (its process killed, its node lost; Serve starts a replacement): 503 with code
    ``replica_died``, which the ingress retries once where that is safe. Any other failure to reach
    the generator: 503 ``unavailable``. The ingress lives on in every case.
    """
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import ReplicaUnavailableError

    cause = exc
    while isinstance(cause, RayTaskError) and cause.cause is not None and cause.cause is not cause:
        cause = cause.cause
    if isinstance(cause, RequestError):
        return RequestError(cause.message, cause.status, cause.code, cause.param, cause.type)
    if isinstance(exc, RayTaskError):
        log.error("generator call failed: %s", str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
        return RequestError(FAILED, 500)
    if isinstance(exc, (RayActorError, ReplicaUnavailableError)):
        log.warning("generator replica died under a call: %s", type(exc).__name__)
        return RequestError(REPLICA_DIED, 503, code=REPLICA_DIED_CODE)
    log.warning("generator call failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return RequestError(UNAVAILABLE, 503, code="unavailable")
